"""Run a function on N ranks of a gloo process group, in forked children (the parent has already imported torch,
transformers and the engine, so a child starts in milliseconds: ``distributed_facts.md``, cost of a test)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank: int, world: int, port: int, out: Path, init: bool, kwargs: dict) -> None:
    code = 1
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        if init:
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        result = fn(rank, **kwargs)
        torch.save(result, out / f"result-{rank}.pt")
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        code = 0
    except BaseException:  # noqa: BLE001 - reported to the parent through the file
        (out / f"error-{rank}.txt").write_text(traceback.format_exc())
    finally:
        os._exit(code)  # never run the parent's (pytest's) exit handlers in a forked child


def run_ranks(fn, out: Path, *, world: int = 2, timeout: float = 240.0, init: bool = True, **kwargs) -> list:
    """``[fn(rank, **kwargs) for rank in range(world)]``, each in its own forked process of one gloo group
    (``init=False``: the environment of ``torchrun`` only, ``fn`` joins the group itself). Results travel through
    ``torch.save`` files in ``out``. A rank that raises or hangs fails the call with its traceback (the others are
    killed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, out, init, kwargs)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    errors = [(out / f"error-{r}.txt").read_text() for r in range(world) if (out / f"error-{r}.txt").is_file()]
    if errors or alive:
        raise AssertionError(f"{len(alive)} rank(s) hung; errors:\n" + "\n".join(errors))
    return [torch.load(out / f"result-{r}.pt", weights_only=False) for r in range(world)]
