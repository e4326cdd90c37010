"""Alpa's Wide-ResNets planned for its clusters: 8 to 64 V100s (p3.16xlarge nodes of 8).

The models are examples/vision_models.py's WideResNet on the meta device (no memory is
allocated), with the shapes of Alpa's benchmark suite (benchmark/alpa/suite_wresnet.py): on
8, 16, 32 and 64 GPUs the 2B, 4B, 6.8B and 13B models, 224x224 images, 1024 classes, fp32,
a step with AdamW, BatchNorm in training. Alpa runs a global batch of 1536 (1520 on 64
GPUs) as 24 to 38 micro-batches and normalizes each micro-batch by its own statistics;
autopar computes the single-device function, whose BatchNorm normalizes by the whole
batch's, so a step here is one of Alpa's micro-batches: 64 images (40 on 64 GPUs), planned
as one batch.

Each row: the mesh chosen, the predicted step time and peak memory per device, how many of
the model's convolutions run split by channels (tensor parallel) or by batch only, and the
seconds planning took.

    python benchmarks/wide_resnet.py               # about three minutes on 2 cores
    python benchmarks/wide_resnet.py --gpus 8 16   # some rows
"""

from __future__ import annotations

import argparse
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
from autopar import Shard  # noqa: E402
from vision_models import WIDE_RESNETS, Classifier, wide_resnet  # noqa: E402

# GPUs -> (Alpa's model for them, images a step: one of Alpa's micro-batches)
ROWS = {8: ("2B", 64), 16: ("4B", 48), 32: ("6.8B", 48), 64: ("13B", 40)}


def plan_row(gpus: int) -> dict:
    name, batch = ROWS[gpus]
    model = Classifier(wide_resnet(name))
    images = torch.empty(batch, 3, 224, 224, device="meta")
    labels = torch.empty(batch, dtype=torch.long, device="meta")
    cluster = autopar.Cluster.preset("p3.16xlarge", nodes=gpus // 8)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = autopar.plan(model, cluster, example_inputs=(images, labels),
                            optimizer="adamw")
    seconds = time.perf_counter() - start
    convs = [n for n in plan.nodes.values() if n["op"] == "conv2d"]
    by_channels = sum(1 for n in convs if any(isinstance(p, Shard) and p.dim in (0, 1)
                                              for lay in n["inputs"][1:2] for p in lay))
    return {"model": name, "params": sum(p.numel() for p in model.parameters()),
            "gpus": gpus, "batch": batch, "mesh": str(plan.mesh),
            "step_s": plan.cost.total_s, "peak_GiB": plan.cost.memory_bytes_per_device / 2**30,
            "convs": len(convs), "by_channels": by_channels, "seconds": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="*", default=list(ROWS),
                        choices=list(ROWS))
    args = parser.parse_args(argv)
    table = Table(title="Alpa's Wide-ResNets on p3.16xlarge (V100 16 GB), planned on meta")
    for col in ("model", "params", "GPUs", "images", "mesh", "step", "peak / device",
                "convs split by channels", "plan s"):
        table.add_column(col)
    for gpus in args.gpus:
        r = plan_row(gpus)
        table.add_row(r["model"], f"{r['params'] / 1e9:.2f} B", str(gpus), str(r["batch"]),
                      r["mesh"], f"{r['step_s']:.2f} s", f"{r['peak_GiB']:.1f} GiB",
                      f"{r['by_channels']} / {r['convs']}", f"{r['seconds']:.0f}")
    Console(width=160).print(table)
    return table


assert set(n for n, _ in ROWS.values()) <= set(WIDE_RESNETS)

if __name__ == "__main__":
    main()
