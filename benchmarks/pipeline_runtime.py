"""Pipelined plans run for real on 4 local gloo processes: predicted against measured step
time, and an uneven split on devices of different speeds against the even split.

1. Predicted vs measured. The GPT, LLaMA and BERT of examples/models.py (4 layers each) under
   pipelined plans (pp 2 x dp 2 with 1F1B, pp 2 x tp 2 with GPipe, pp 4 with 1F1B, 4
   micro-batches) and one plan without stages for reference, planned for ``Cluster.local(4)``
   (this machine's measured figures). Each trains with ``pm.step`` and AdamW: warm-up steps,
   then the median of timed steps between barriers, as the slowest rank saw them. The table
   gives the prediction ``plan.cost.total_s``, the measurement, the relative error, and
   Spearman's rank correlation over every row.
2. Slowed stage. Ranks 2 and 3 (the second stage of pp 2 x dp 2) are slowed: after each
   forward of their stage program and each backward, they sleep for as long as it took, as
   devices half as fast would. The Cluster says so: two nodes of this machine's processes,
   the second with half the FLOP/s and memory bandwidth. autopar's split of an 8-layer GPT
   (with micro-batches and schedule as it plans them) runs against the even split (4/4) with
   the same micro-batches and schedule; both predicted and measured.

    python benchmarks/pipeline_runtime.py      # a few minutes on 2 cores
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autopar  # noqa: E402
from common import run_on_processes, time_steps  # noqa: E402

WORLD = 4
WARMUP = 2
STEPS = 5
SLOWDOWN = 2.0      # the slowed stage takes this many times as long


def _model(name, layers=4):
    from models import (GPT, Bert, BertConfig, GPTConfig, Llama, LlamaConfig,
                        tiny_batch)
    torch.manual_seed(0)
    if name == "gpt":
        cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=layers, n_head=4, n_embd=128)
        return GPT(cfg), tiny_batch(cfg, 16, 64)
    if name == "llama":
        cfg = LlamaConfig(vocab_size=256, dim=128, n_layers=layers, n_heads=4, n_kv_heads=2,
                          hidden_dim=384, max_seq_len=64)
        return Llama(cfg), tiny_batch(cfg, 16, 64)
    cfg = BertConfig(vocab_size=256, hidden=128, n_layers=layers, n_heads=4,
                     intermediate=512, max_position=64)
    tokens, _ = tiny_batch(cfg, 16, 64)
    types = torch.zeros_like(tokens)
    return Bert(cfg), (tokens, torch.ones_like(tokens), types, torch.arange(16) % 4)


PLANS = {
    "pp2 x dp2, 1f1b": dict(mesh={"pp": 2, "dp": 2}, schedule="1f1b", micro_batches=4),
    "pp2 x tp2, gpipe": dict(mesh={"pp": 2, "tp": 2}, schedule="gpipe", micro_batches=4),
    "pp4, 1f1b": dict(mesh={"pp": 4}, schedule="1f1b", micro_batches=4),
    "dp4 (no stages)": dict(mesh={"dp": 4}),
}


def _timed(pm, batch) -> float:
    optimizer = torch.optim.AdamW(pm.parameters(), lr=1e-4)

    def step():
        pm.step(*batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(WARMUP):
        step()
    return statistics.median(time_steps(step, STEPS))


def predicted_vs_measured():
    warnings.filterwarnings("ignore")
    cluster = autopar.Cluster.local(WORLD)
    rows = []
    for name in ("gpt", "llama", "bert"):
        for plan_name, opts in PLANS.items():
            model, batch = _model(name)
            try:
                pm = autopar.compile(model, cluster, example_inputs=batch, **opts)
                rows.append([name, plan_name, pm.plan.cost.total_s, _timed(pm, batch)])
            except Exception as e:  # noqa: BLE001 - reported in the table
                rows.append([name, plan_name, None, f"{type(e).__name__}: {str(e)[:80]}"])
            dist.barrier()
    return rows


def _slow_cluster():
    local = autopar.Cluster.local(WORLD)
    node = local.nodes[0]
    dev = node.device
    slow = dataclasses.replace(
        dev, name=f"{dev.name} (half speed)",
        peak_flops={k: v / SLOWDOWN for k, v in dev.peak_flops.items()},
        memory_bandwidth_bytes_per_s=dev.memory_bandwidth_bytes_per_s / SLOWDOWN,
        op_overhead_s=None if dev.op_overhead_s is None else dev.op_overhead_s * SLOWDOWN)
    from autopar.cost.cluster import NodeSpec
    return autopar.Cluster((NodeSpec(dev, 2, node.intra_node),
                            NodeSpec(slow, 2, node.intra_node)), node.intra_node,
                           name="local: 2 + 2 at half speed")


def _slow_down_here():
    """Make this process's pipeline work take SLOWDOWN times as long: sleep after each stage
    forward and each backward for (SLOWDOWN - 1) times what it took."""
    from autopar.runtime import module

    def dilated(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            time.sleep((SLOWDOWN - 1) * (time.perf_counter() - start))
            return out
        return run
    module.ParallelModule._run = dilated(module.ParallelModule._run)
    torch.autograd.backward = dilated(torch.autograd.backward)


def slowed_stage():
    warnings.filterwarnings("ignore")
    cluster = _slow_cluster()
    if dist.get_rank() >= 2:
        _slow_down_here()
    out = {}
    model, batch = _model("gpt", layers=8)
    pm = autopar.compile(model, cluster, example_inputs=batch, mesh={"pp": 2, "dp": 2})
    plan = pm.plan
    out["autopar"] = (plan.stats["pipeline"]["firsts"], plan.schedule, plan.micro_batches,
                      plan.cost.total_s, _timed(pm, batch))
    dist.barrier()
    model, batch = _model("gpt", layers=8)
    even = autopar.compile(model, cluster, example_inputs=batch, mesh={"pp": 2, "dp": 2},
                           stages=(4, 4), schedule=plan.schedule,
                           micro_batches=plan.micro_batches)
    out["even"] = ([0, 4], even.plan.schedule, even.plan.micro_batches,
                   even.plan.cost.total_s, _timed(even, batch))
    return out


def main():
    console = Console(width=160)
    rows = run_on_processes(predicted_vs_measured, world=WORLD)
    table = Table(title=f"pipelined plans on {WORLD} gloo processes: predicted vs measured")
    for col in ("model", "plan", "predicted", "measured", "error"):
        table.add_column(col)
    pairs = []
    for name, plan, pred, meas in rows:
        if pred is None:
            table.add_row(name, plan, "-", str(meas), "-")
            continue
        pairs.append((pred, meas))
        table.add_row(name, plan, f"{pred * 1e3:.1f} ms", f"{meas * 1e3:.1f} ms",
                      f"{(pred - meas) / meas:+.0%}")
    console.print(table)
    if len(pairs) > 2:
        rho = spearmanr([p for p, _ in pairs], [m for _, m in pairs]).statistic
        errors = sorted(abs(p - m) / m for p, m in pairs)
        console.print(f"rank correlation {rho:.3f}; median error {statistics.median(errors):.0%}"
                      f", worst {errors[-1]:.0%}")
    got = run_on_processes(slowed_stage, world=WORLD)
    table = Table(title="8-layer GPT, pp2 x dp2, ranks 2-3 slowed to half speed "
                        "(and a Cluster that says so)")
    for col in ("split", "first layers", "schedule", "micro-batches", "predicted", "measured"):
        table.add_column(col)
    for key in ("autopar", "even"):
        firsts, sched, m, pred, meas = got[key]
        table.add_row(key, str(firsts), sched, str(m), f"{pred * 1e3:.1f} ms",
                      f"{meas * 1e3:.1f} ms")
    console.print(table)
    a, e = got["autopar"], got["even"]
    console.print(f"even / autopar: predicted {e[3] / a[3]:.2f}x, measured {e[4] / a[4]:.2f}x")


if __name__ == "__main__":
    main()
