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
from local_world import join, launch  # noqa: E402
from models import Llama, LlamaConfig, tiny_batch  # noqa: E402

WORLD, STEPS = 4, 5
PINS = {"layers.*.attention.w[qkv].weight": "RS(0)",    # column-parallel on tp
        "layers.*.attention.wo.weight": "RS(1)",        # row-parallel: partial sums
        "layers.*.feed_forward.w[13].weight": "RS(0)",
        "layers.*.feed_forward.w2.weight": "RS(1)",
        "tokens": "S(0)R", "targets": "S(0)R"}          # each dp rank takes half the batch


def worker(rank: int, world: int, port: int):
    join(rank, world, port)                      # same weights and data on every rank
    cfg = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      hidden_dim=128, max_seq_len=16)
    model = Llama(cfg)
    single = copy.deepcopy(model)
    tokens, targets = tiny_batch(cfg, batch=8, seq=16)
    plan = autopar.plan(model, autopar.Cluster.local(world, measure=False),
                        example_inputs=(tokens, targets), mesh={"dp": 2, "tp": 2},
                        constraints=PINS)
    if rank == 0:
        print(module_styles(model, plan).explain())
    autopar.apply(model, plan)                   # the model itself, now DTensor and FSDP2

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
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
        ref_opt = torch.optim.AdamW(single.parameters(), lr=1e-2)
        reference = []
        for _ in range(STEPS):
            loss = single(tokens, targets)
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            reference.append(loss.item())
        worst = max(abs(a - b) / abs(b) for a, b in zip(mean.tolist(), reference))
        for i, (a, b) in enumerate(zip(mean.tolist(), reference)):
            print(f"step {i}: one device {b:.6f}, {world} processes {a:.6f}")
        verdict = "matches" if worst <= 1e-5 else "DIFFERS FROM"
        print(f"the applied plan {verdict} one device (worst relative difference {worst:.1e})")
        if worst > 1e-5:
            sys.exit(1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    launch(worker, WORLD)
