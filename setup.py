"""Packaging shim. The compiled extension (``csrc/``) is NOT built at install time, on purpose.

Building it here would need torch's headers inside pip's isolated build environment, where pip installs a torch of
its own choosing (a multi-GB CUDA build) regardless of the torch the user installed. Instead ``kernels._extension``
compiles ``csrc/cpu/*.cpp`` (and ``csrc/cuda/*.cu`` on a CUDA torch with nvcc) on first use against the torch that
is already imported, with ``torch.utils.cpp_extension.load``, and caches the libraries (~15 s per source once on a
2-core CPU; milliseconds to load afterwards). So ``pip install -e .`` and the README's install command work
unchanged on any machine, with or without a compiler:

    python -m kernels           # build ahead of time (e.g. in an image) and report
    RLHF_ENGINE_BUILD_EXT=0 ...            # never build or load it; every op uses Triton / PyTorch
    RLHF_ENGINE_EXT_DIR=/path ...          # where the build cache lives (default ~/.cache/rlhf_engine/extensions)

The sources are read from the checkout, so the extension is available to editable installs (``pip install -e .``,
the README's command); a non-editable wheel runs without it (``kernels.has_extension()`` is False).
"""

from setuptools import setup

setup()
