"""Running one function as a world of local gloo processes, for the real multi-process tests.

Each rank writes ``rank{r}.json`` into the result folder; :func:`run_world` reads them back.
A rank killed by a signal (an abort inside gloo, seen once under heavy load) is retried once;
a second crash fails with every rank's Python stack, which :func:`dump_stack_on_crash` leaves.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import socket
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dump_stack_on_crash(result_dir: str, rank: int) -> None:
    """In a rank: a crash inside torch's C++ (an abort, a segfault) leaves its Python stack."""
    log = open(os.path.join(result_dir, f"rank{rank}.crash"), "w")  # noqa: SIM115
    faulthandler.enable(log)


def join_world(rank: int, world: int, port: int, result_dir: str, timeout_s: int) -> None:
    """In a rank: leave a stack on a crash, join the gloo world, and compute on one thread
    (the ranks share this machine's cores)."""
    dump_stack_on_crash(result_dir, rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    torch.set_num_threads(1)


def run_world(worker, world: int, tmp_path_factory, name: str) -> list:
    """``worker(rank, world, port, result_dir)`` on ``world`` spawned processes; every rank's
    results, in rank order."""
    for attempt in range(2):
        out = tmp_path_factory.mktemp(name)
        try:
            mp.start_processes(worker, args=(world, free_port(), str(out)), nprocs=world,
                               join=True, start_method="spawn")
            break
        except mp.ProcessExitedException as e:
            crashes = "\n".join(f"rank {r}:\n{(out / f'rank{r}.crash').read_text()}"
                                for r in range(world) if (out / f"rank{r}.crash").exists())
            if attempt:
                raise AssertionError(f"{e}\n{crashes}") from e
            warnings.warn(f"{name}: {e}; retrying once. Stacks:\n{crashes}", stacklevel=1)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
