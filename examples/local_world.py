"""What the examples that train on local CPU processes share: starting the world (spawned
here, or started by torchrun), joining it, and a training loop that records the losses."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(worker, world: int) -> None:
    """``worker(rank, world, port)`` on every process of a local gloo world: the ones
    torchrun started, or ``world`` processes spawned here."""
    if under_torchrun():
        dist.init_process_group("gloo")
        worker(dist.get_rank(), dist.get_world_size(), 0)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(world, port), nprocs=world, start_method="spawn")


def join(rank: int, world: int, port: int) -> None:
    """In a worker: join the gloo world (unless torchrun's is joined already), compute on one
    thread (the processes share this machine's cores), and seed alike on every rank, so that
    every rank builds the same weights and data."""
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    torch.manual_seed(0)


def train(model, batches, optimizer) -> list:
    """One ``optimizer(parameters)`` step per batch on the loss ``model(*batch)``; the losses."""
    opt = optimizer(model.parameters())
    losses = []
    for batch in batches:
        loss = model(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def small_llama():
    """The examples' LLaMA (examples/models.py) and a batch of 8 sequences of 16 tokens."""
    from models import Llama, LlamaConfig, tiny_batch
    cfg = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      hidden_dim=128, max_seq_len=16)
    return Llama(cfg), tiny_batch(cfg, batch=8, seq=16)


def compare(losses, reference, what: str) -> None:
    """The losses of ``what`` beside one device's, step by step, as a table; exits non-zero
    where they differ by more than fp32's tolerance."""
    import sys

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"training loss: {what} vs one device")
    for col in ("step", "one device", what, "relative difference"):
        table.add_column(col, justify="right")
    worst = 0.0
    for i, (a, b) in enumerate(zip(losses, reference)):
        rel = abs(a - b) / abs(b)
        worst = max(worst, rel)
        table.add_row(str(i), f"{b:.6f}", f"{a:.6f}", f"{rel:.1e}")
    Console().print(table)
    verdict = "matches" if worst <= 1e-5 else "DIFFERS FROM"
    print(f"{what} {verdict} one device (worst relative difference {worst:.1e}; fp32 "
          "tolerance 1e-5)")
    if worst > 1e-5:
        sys.exit(1)
