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
