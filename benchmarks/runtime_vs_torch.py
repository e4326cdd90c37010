"""autopar's automatic plan against hand-written PyTorch parallelism, same models, same run.

On 2 local gloo processes (spawned once; one thread each) it trains six models whose best
strategy differs four ways: those of ``common.WORKLOADS`` (a wide residual MLP, the GPT and the
LLaMA of examples/models.py), a very wide MLP on a tiny batch (weights dwarf activations), a
narrow MLP on a large batch (the reverse) and a deeper, narrower GPT on more tokens:

- autopar: ``autopar.compile(model, Cluster.local(2), example_inputs=batch)``, no mesh and no
  constraints: the plan it chooses;
- DistributedDataParallel: each rank takes half the batch, gradients all-reduced in buckets;
- tensor parallel with ``torch.distributed.tensor.parallel.parallelize_module``: the MLP layers
  column- then row-parallel (ColwiseParallel / RowwiseParallel), attention, embeddings and
  norms replicated, the whole batch on every rank;
- FSDP2 ``torch.distributed.fsdp.fully_shard`` on every block, then the root, half the batch
  per rank.

Each first step's loss is checked against the same model on one device (the check column);
then the four take turns, a few timed steps each round (forward, backward, AdamW step, each
step between barriers), and the table gives the median step and its ratio to the fastest. A
baseline that fails on CPU/gloo in this torch version is a row with its error, not dropped.

    python benchmarks/runtime_vs_torch.py             # from the repository root, ~2 minutes
    python benchmarks/runtime_vs_torch.py --cached    # plan with Cluster.local()'s cached figures
"""

from __future__ import annotations

import fnmatch
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from rich.console import Console
from rich.table import Table

import autopar
from common import (SEED, WORKLOADS, WORLD, ResidualMLP, Workload, build, collectives, layouts,
                    parse_args, relative_error, run_planned_here, short_error, time_rows,
                    train_step)

WARMUP_STEPS = 3       # the first of them is the loss check
ROUNDS = 4             # the contenders take turns: STEPS_PER_ROUND steps each, ROUNDS times over
STEPS_PER_ROUND = 3
LEARNING_RATE = 1e-4
LOSS_RTOL = 1e-5       # fp32, as autopar's own equivalence tests


def _mlp(dim: int, hidden: int, blocks: int, batch: int) -> Workload:
    def make_batch():
        g = torch.Generator().manual_seed(SEED)
        return torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
    return Workload(f"mlp {blocks}x{dim}x{hidden}, batch {batch}",
                    lambda: ResidualMLP(dim, hidden, blocks), make_batch,
                    megatron={"blocks.*.fc1.*": 0, "blocks.*.fc2.weight": 1},
                    mlp_layers={"blocks.*.fc1": "colwise", "blocks.*.fc2": "rowwise"},
                    blocks_attr="blocks")


def _deep_gpt() -> Workload:
    from models import GPT, GPTConfig, tiny_batch
    cfg = GPTConfig(vocab_size=512, block_size=128, n_layer=4, n_head=4, n_embd=128)
    return Workload("gpt 4x128, 16x128 tokens", lambda: GPT(cfg),
                    lambda: tiny_batch(cfg, 16, 128), megatron={},
                    mlp_layers={"h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"},
                    blocks_attr="h")


MODELS = [*WORKLOADS,
          _mlp(2048, 8192, 1, 8),       # 34M parameters, 8 rows: splitting the weights pays
          _mlp(256, 1024, 4, 4096),     # 2M parameters, 4096 rows: splitting the batch pays
          _deep_gpt()]


@dataclass
class Contender:
    """One way of training the model: its module, this rank's inputs, and whether its loss
    is this rank's share of the batch (then averaged over ranks to compare)."""

    model: nn.Module
    batch: tuple
    averaged: bool
    note: str = ""
    predicted_s: float | None = None
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self):
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE)

    def step(self) -> torch.Tensor:
        return train_step(self.model, self.optimizer, self.batch)

    def global_loss(self, loss: torch.Tensor) -> float:
        if self.averaged:
            loss = loss.clone()
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        return loss.item()


# -- the contenders (each builds the model afresh, same weights on every rank) ---------------------

def rank_slice(batch: tuple) -> tuple:
    """This rank's part of the global batch (split on dim 0, as data parallel does)."""
    return tuple(t.chunk(WORLD)[dist.get_rank()].contiguous() for t in batch)


def with_autopar(workload, batch, cluster, mesh) -> Contender:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ops without a rule are named by cost_model_accuracy
        pm = autopar.compile(build(workload), cluster, example_inputs=batch)
    axes = " x ".join(f"{k}={v}" for k, v in pm.plan.mesh.items())
    note = f"{axes}; {layouts(pm.plan)}; {collectives(pm.code)}"
    return Contender(pm, batch, averaged=False, note=note, predicted_s=pm.plan.cost.total_s)


def with_ddp(workload, batch, cluster, mesh) -> Contender:
    from torch.nn.parallel import DistributedDataParallel
    model = DistributedDataParallel(build(workload))
    return Contender(model, rank_slice(batch), averaged=True,
                     note="batch split, gradients all-reduced in 25 MB buckets")


def with_tensor_parallel(workload, batch, cluster, mesh) -> Contender:
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    model = build(workload)
    plan = {name: styles[style]() for name, _ in model.named_modules()
            for glob, style in workload.mlp_layers.items() if fnmatch.fnmatchcase(name, glob)}
    parallelize_module(model, mesh, plan)
    return Contender(model, batch, averaged=False,
                     note=f"{len(plan)} MLP linears col/row-parallel; the rest replicated")


def with_fsdp2(workload, batch, cluster, mesh) -> Contender:
    from torch.distributed.fsdp import fully_shard
    model = build(workload)
    for block in getattr(model, workload.blocks_attr):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return Contender(model, rank_slice(batch), averaged=True,
                     note="batch split; parameters sharded per block, gathered for use")


CONTENDERS = {
    "autopar (automatic plan)": with_autopar,
    "DistributedDataParallel": with_ddp,
    "tensor parallel (parallelize_module)": with_tensor_parallel,
    "FSDP2 (fully_shard)": with_fsdp2,
}


# -- measuring (inside each process) ---------------------------------------------------------------

def reference_loss(workload, batch) -> float:
    """The first step's loss on one device."""
    with torch.no_grad():
        return build(workload)(*batch).item()


def prepare(name, make, workload, batch, cluster, mesh, reference) -> tuple:
    """(row, contender or None): built, its first loss checked, warmed up."""
    row = {"model": workload.name, "implementation": name}
    try:
        contender = make(workload, batch, cluster, mesh)
        loss = contender.global_loss(contender.step())
        for _ in range(WARMUP_STEPS - 1):
            contender.step()
    except Exception as e:  # noqa: BLE001 - a baseline that fails here is a table row
        return {**row, "error": short_error(e, 240)}, None
    row.update(note=contender.note, predicted_s=contender.predicted_s, loss=loss,
               reference=reference, loss_error=relative_error(loss, reference))
    return row, contender


def compare_workload(workload, cluster, mesh) -> list:
    batch = workload.batch()
    reference = reference_loss(workload, batch)
    rows, steps = {}, {}
    for name, make in CONTENDERS.items():
        rows[name], contender = prepare(name, make, workload, batch, cluster, mesh, reference)
        if contender is not None:
            steps[name] = contender.step
    return time_rows(rows, steps, ROUNDS, STEPS_PER_ROUND)


def compare_all() -> list:
    from torch.distributed.device_mesh import init_device_mesh
    cluster = autopar.Cluster.local(WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    return [row for workload in MODELS for row in compare_workload(workload, cluster, mesh)]


# -- reporting (in the parent) ---------------------------------------------------------------------

def ms(t: float) -> str:
    return f"{t * 1e3:.1f}"


def loss_check(r) -> str:
    ok = r["loss_error"] <= LOSS_RTOL
    mark = "[green]ok" if ok else "[red]differs"
    return f"{mark}[/] {r['loss_error']:.0e}\n({r['loss']:.5f})"


def results_table(rows) -> Table:
    table = Table(title=f"training step on {WORLD} gloo processes, autopar vs hand-written "
                        f"PyTorch (median of {ROUNDS * STEPS_PER_ROUND} steps, taken in turns)")
    for col, justify in (("model", "left"), ("implementation", "left"), ("what it does", "left"),
                         ("first loss vs\none device", "right"), ("step ms\n(min-max)", "right"),
                         ("x fastest", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        timed = [r["measured_s"] for r in group if "measured_s" in r]
        fastest = min(timed) if timed else None
        for r in group:
            table.add_row(*row_cells(r, fastest))
        table.add_section()
    return table


def row_cells(r, fastest) -> list:
    if "error" in r:
        return [r["model"], r["implementation"], f"[red]does not run: {r['error']}", "", "", ""]
    note = r["note"]
    if r["predicted_s"] is not None:
        note += f"; predicted {ms(r['predicted_s'])} ms"
    ratio = r["measured_s"] / fastest
    ratio_text = f"[bold]{ratio:.2f}" if ratio == 1 else f"{ratio:.2f}"
    return [r["model"], r["implementation"], note, loss_check(r),
            f"{ms(r['measured_s'])}\n({ms(r['fastest_s'])}-{ms(r['slowest_s'])})", ratio_text]


def main(argv=None):
    args = parse_args(argv, __doc__)
    start = time.perf_counter()
    console = Console(width=200)
    rows = run_planned_here(console, compare_all, args.cached)
    console.print(results_table(rows))
    for line in summary(rows):
        console.print(line)
    console.print(f"torch {torch.__version__}; finished in {time.perf_counter() - start:.0f} s")


def summary(rows) -> list:
    """Per model, autopar's step over the fastest hand-written one, with the spread of both:
    where their ranges overlap, noise may decide the order."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model and "measured_s" in r]
        ours = next((r for r in group if r["implementation"].startswith("autopar")), None)
        theirs = [r for r in group if r is not ours]
        if ours is None or not theirs:
            continue
        best = min(theirs, key=lambda r: r["measured_s"])
        overlap = ours["fastest_s"] <= best["slowest_s"] and best["fastest_s"] <= ours["slowest_s"]
        out.append(f"{model}: autopar {ours['measured_s'] / best['measured_s']:.2f}x the fastest "
                   f"hand-written ({best['implementation']}); ranges "
                   f"{ms(ours['fastest_s'])}-{ms(ours['slowest_s'])} and "
                   f"{ms(best['fastest_s'])}-{ms(best['slowest_s'])} ms"
                   + (" overlap" if overlap else " apart"))
    return out


if __name__ == "__main__":
    sys.exit(main())
