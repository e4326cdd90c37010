"""Plan a small LLaMA for a 4-device cluster, then train it as 4 local CPU processes (gloo)
and show that the loss matches a single device step for step.

The plan is data parallel on "dp" (the batch split in two) and Megatron-style tensor parallel
on "tp": the attention and feed-forward projections pinned as DTensor's ColwiseParallel and
RowwiseParallel mean it (``Shard(0)``: the weight's output features split, so the matmul is
column-parallel; ``Shard(1)``: its input features split, row-parallel, partial sums reduced).
The planner chooses the layout of everything else.

    python examples/quickstart.py              # spawns the 4 processes itself
    torchrun --nproc_per_node 4 examples/quickstart.py
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autopar  # noqa: E402
from autopar import Replicate, Shard  # noqa: E402
from local_world import compare, join, launch, small_llama, train  # noqa: E402

WORLD = 4
STEPS = 5
MESH = {"dp": 2, "tp": 2}
COLUMN, ROW = (Replicate(), Shard(0)), (Replicate(), Shard(1))   # one placement per axis
PINS = {
    "layers.*.attention.w[qkv].weight": COLUMN,      # query, key, value: heads split on tp
    "layers.*.attention.wo.weight": ROW,             # output projection: partial sums
    "layers.*.feed_forward.w[13].weight": COLUMN,    # SwiGLU gate and up projections
    "layers.*.feed_forward.w2.weight": ROW,          # down projection
    "tokens": (Shard(0), Replicate()),               # each dp rank takes half the batch
    "targets": (Shard(0), Replicate()),
}


def adamw(parameters):
    return torch.optim.AdamW(parameters, lr=1e-2)


def worker(rank: int, world: int, port: int):
    join(rank, world, port)                    # same weights and data on every rank
    model, (tokens, targets) = small_llama()
    single = copy.deepcopy(model)

    pm = autopar.compile(model, autopar.Cluster.local(), example_inputs=(tokens, targets),
                         mesh=MESH, constraints=PINS)
    if rank == 0:
        print(pm.plan.explain())
        print("rank 0 runs (split weights used as they are held, the batch sliced on entry, "
              "a collective wherever layouts meet):\n")
        print(pm.code)
    losses = train(pm, [(tokens, targets)] * STEPS, adamw)
    if rank == 0:
        reference = train(single, [(tokens, targets)] * STEPS, adamw)
        compare(losses, reference, f"{WORLD} processes (mesh {MESH})")
    dist.barrier()
    dist.destroy_process_group()


def main():
    launch(worker, WORLD)


if __name__ == "__main__":
    main()
