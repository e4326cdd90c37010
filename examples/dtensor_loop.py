"""Take autopar's plan into a training loop of one's own: plan a small LLaMA for 4 devices
(data parallel on "dp", Megatron-style tensor parallel on "tp"), apply the plan to the
model itself with PyTorch's DTensor APIs (``parallelize_module`` styles, then FSDP2's
``fully_shard``), and train it with a plain loop on 4 local CPU processes (gloo); the loss
matches one device step for step.

    python examples/dtensor_loop.py                 # spawns the 4 processes itself
    torchrun --nproc_per_node 4 examples/dtensor_loop.py
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autopar  # noqa: E402
from autopar.runtime.dtensor import local_inputs, module_styles  # noqa: E402
from local_world import compare, join, launch, small_llama, train  # noqa: E402

WORLD, STEPS = 4, 5
PINS = {"layers.*.attention.w[qkv].weight": "RS(0)",    # column-parallel on tp
        "layers.*.attention.wo.weight": "RS(1)",        # row-parallel: partial sums
        "layers.*.feed_forward.w[13].weight": "RS(0)",
        "layers.*.feed_forward.w2.weight": "RS(1)",
        "tokens": "S(0)R", "targets": "S(0)R"}          # each dp rank takes half the batch


def adamw(parameters):
    return torch.optim.AdamW(parameters, lr=1e-2)


def worker(rank: int, world: int, port: int):
    join(rank, world, port)                      # same weights and data on every rank
    model, (tokens, targets) = small_llama()
    single = copy.deepcopy(model)
    plan = autopar.plan(model, autopar.Cluster.local(world, measure=False),
                        example_inputs=(tokens, targets), mesh={"dp": 2, "tp": 2},
                        constraints=PINS)
    if rank == 0:
        print(module_styles(model, plan).explain())
    autopar.apply(model, plan)                   # the model itself, now DTensor and FSDP2

    optimizer = adamw(model.parameters())
    mine = local_inputs(plan, {"tokens": tokens, "targets": targets})   # this rank's slice
    losses = []
    for _ in range(STEPS):                       # the loop a user keeps
        loss = model(**mine)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().full_tensor().item() if hasattr(loss, "full_tensor")
                      else loss.item())
    # the mean loss over the data-parallel slices is the whole batch's
    mean = torch.tensor(losses)
    dist.all_reduce(mean)
    mean /= world
    if rank == 0:
        reference = train(single, [(tokens, targets)] * STEPS, adamw)
        compare(mean.tolist(), reference, f"{world} processes, plan applied")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    launch(worker, WORLD)
