"""AMP's setups (Li et al., NeurIPS 2022), priced two ways by autopar's own cost model:
Megatron-LM's heuristic (tensor parallel inside each node, a pipeline stage per node, layers
split evenly, 1F1B) and the plan autopar chooses (every mesh, stage count, cut, device-group
order, micro-batch count and schedule it searches). Models are built on the meta device.

- GPT-2 medium shape (24 layers, width 1024, 1024 tokens, global batch 32) on 4 x g4dn.12xlarge
  (16 T4s, homogeneous);
- the same GPT-2 on 3 x p3.8xlarge (V100, NVLink, 10 Gb/s between nodes) + 1 x g4dn.12xlarge
  (T4): AMP measured 1.97 s/iter with Megatron's heuristic and 1.28 s with its plan (1.54x);
- a TransGAN-style generator (examples/models.py; uneven levels: wide and short, then long and
  narrow) on 4 x p3.8xlarge: AMP measured 1.89 s and 1.07 s (1.77x).

    python benchmarks/heterogeneous.py          # a few minutes on 2 cores
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch
from rich.console import Console
from rich.table import Table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import autopar  # noqa: E402
from models import GPT, GPTConfig, TransGAN, TransGANConfig  # noqa: E402

GLOBAL_BATCH = 32
PRECISION = "bf16-mixed"   # fp16 on V100 and T4 (they have no bf16 units)


def gpt2():
    cfg = GPTConfig(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=1024)
    with torch.device("meta"):
        model = GPT(cfg)
    idx = torch.zeros(GLOBAL_BATCH, 1024, dtype=torch.long, device="meta")
    return model, (idx, idx.clone())


def transgan():
    """TransGAN-L's generator shape: widths 1024, 256, 64 over 8x8, 16x16, 32x32 tokens,
    5, 4 and 2 blocks (Jiang et al., table 1)."""
    cfg = TransGANConfig(latent_dim=256, base_tokens=64, dims=(1024, 256, 64),
                         depths=(5, 4, 2), n_head=4)
    with torch.device("meta"):
        model = TransGAN(cfg)
    z = torch.zeros(GLOBAL_BATCH, cfg.latent_dim, device="meta")
    image = torch.zeros(GLOBAL_BATCH, cfg.base_tokens * 16, 3, device="meta")
    return model, (z, image)


def setups():
    return [
        ("GPT-2, 4 x g4dn.12xlarge", gpt2, 24,
         autopar.Cluster.preset("g4dn.12xlarge", nodes=4), None),
        ("GPT-2, 3 x p3.8xlarge + g4dn.12xlarge", gpt2, 24,
         autopar.Cluster.preset("p3.8xlarge", nodes=3) + autopar.Cluster.preset(
             "g4dn.12xlarge"), 1.97 / 1.28),
        ("TransGAN, 4 x p3.8xlarge", transgan, 11,
         autopar.Cluster.preset("p3.8xlarge", nodes=4), 1.89 / 1.07),
    ]


def describe(plan) -> str:
    mesh = " x ".join(f"{k}{v}" for k, v in plan.mesh.items())
    if plan.stages:
        split = "/".join(str(len(st["layers"])) for st in plan.stages)
        kinds = ",".join(st["device"].split(" x ")[0] for st in plan.stages)
        return f"{mesh}, layers {split} on {kinds}, {plan.schedule} m={plan.micro_batches}"
    return f"{mesh}, m={plan.micro_batches}"


def megatron(model, args, cluster, layers: int):
    """Tensor parallel inside nodes, a stage per node, an even split of the layers, 1F1B,
    the micro-batch count autopar prices fastest under those pins."""
    nodes, per_node = len(cluster.nodes), cluster.nodes[0].count
    return autopar.plan(model, cluster, example_inputs=args, mesh={"pp": nodes, "tp": per_node},
                        schedule="1f1b", stages=even(layers, nodes), precision=PRECISION)


def even(n: int, stages: int) -> tuple:
    """Layers per stage, as even as they go (the first stages take one more)."""
    return tuple(n // stages + (1 if s < n % stages else 0) for s in range(stages))


def main():
    warnings.filterwarnings("ignore")
    table = Table(title="AMP's setups priced by autopar's cost model")
    for col in ("setup", "Megatron heuristic", "step", "autopar's plan", "step", "ratio",
                "AMP's measured ratio", "plan s"):
        table.add_column(col)
    for name, build, layers, cluster, published in setups():
        model, args = build()
        base = megatron(model, args, cluster, layers)
        start = time.perf_counter()
        plan = autopar.plan(model, cluster, example_inputs=args, precision=PRECISION)
        seconds = time.perf_counter() - start
        ratio = base.cost.total_s / plan.cost.total_s
        table.add_row(name, describe(base), f"{base.cost.total_s:.3f} s", describe(plan),
                      f"{plan.cost.total_s:.3f} s", f"{ratio:.2f}x",
                      f"{published:.2f}x" if published else "-", f"{seconds:.1f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
