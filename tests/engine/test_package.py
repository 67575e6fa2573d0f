"""The package guard against Hugging Face's `kernels` distribution, and the CLI entry point."""

import importlib
import json
import sys
import types

import pytest


def test_engine_refuses_a_foreign_kernels_package(monkeypatch):
    fake = types.ModuleType("kernels")
    fake.__file__ = "/site-packages/kernels/__init__.py"  # e.g. the hub kernel loader
    monkeypatch.setitem(sys.modules, "kernels", fake)
    monkeypatch.delitem(sys.modules, "engine", raising=False)
    with pytest.raises(ImportError, match="is not rlhf-engine's: Hugging Face's 'kernels' distribution"):
        importlib.import_module("engine")
    monkeypatch.delitem(sys.modules, "engine", raising=False)


def test_engine_imports_with_our_kernels():
    import engine
    import kernels

    assert kernels.__rlhf_engine_kernels__ is True
    assert engine.__version__ == kernels.__version__


def test_cli_env_prints_the_backend_report(capsys):
    from engine.cli import main

    assert main(["env"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] and "compiled_extension" in report


@pytest.mark.parametrize("module", ["kernels", "engine", "engine.config", "engine.algorithms", "engine.models",
                                    "engine.rewards", "engine.integrations.trl"])
def test_every_public_name_resolves(module):
    """The README's stable public API is each package's ``__all__``: every name in it imports, and ``dir`` lists it."""
    if module == "engine.integrations.trl":
        pytest.importorskip("trl")
    mod = importlib.import_module(module)
    assert mod.__all__ and len(set(mod.__all__)) == len(mod.__all__)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{module}.{name}"
        assert name in dir(mod), f"{module}.{name}"
