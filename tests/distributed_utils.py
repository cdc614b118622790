"""Run a function on N real processes joined by a gloo process group, and collect what each returns."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], out_dir: str, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, **kwargs)
        torch.save({"result": result}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world_size: int, tmp_path: Path, **kwargs: Any) -> list[Any]:
    """``fn(rank, world_size, **kwargs)`` on every rank; returns the results in rank order."""
    out_dir = tmp_path / f"ranks{world_size}_{fn.__name__}"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.start_processes(
            _worker, args=(world_size, free_port(), fn, str(out_dir), kwargs), nprocs=world_size, start_method="spawn"
        )
    except mp.ProcessRaisedException as error:
        errors = "\n".join(p.read_text() for p in sorted(out_dir.glob("*.err")))
        raise AssertionError(f"a rank failed:\n{errors or error}") from None
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True)["result"] for r in range(world_size)]
