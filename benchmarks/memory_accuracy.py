"""How well autopar's memory model predicts what a training step really holds per device.

For three zoo models (the GPT, LLaMA and BERT of examples/models.py) it compiles eight plans
each for ``Cluster.local(2)``, forced through ``mesh=``, ``constraints=``, ``recompute=`` and
``micro_batches=``: data parallel; sharded parameters (every parameter stored split on dim 0);
Megatron tensor parallel; data parallel with full and with selective recomputation of every
block; data parallel over 2 micro-batches; sharded parameters with selective recomputation
over 2 micro-batches; and the automatic plan.

Each plan trains for real on 2 gloo processes (two warm-up steps, so that the optimizer's
states exist; gradients are zeroed in place, not freed, as the model counts them held). The
third step, ``pm.step(*batch)`` (forward and backward of every micro-batch), runs under
``autopar.runtime.memory.measure_step``: a dispatch mode that sees every op's outputs and
follows each storage until it is freed, starting from the parameters, their gradients and
the optimizer's states. It reports, per device (the largest over the ranks):

- held: parameters, gradients and optimizer states before the step, against
  ``cost.parameter_bytes + gradient_bytes + optimizer_bytes``;
- saved: what the step holds beyond them when the first backward starts (the activations
  saved for it and values still to be read), against ``cost.activation_bytes``;
- peak: the most alive at any point of the step, against ``cost.memory_bytes_per_device``.

    python benchmarks/memory_accuracy.py          # from the repository root, ~1 minute

The plans are priced with nominal local figures (``measure=False``): memory does not depend
on this machine's speed, and the plan of each forced configuration is then the same on any
machine. The goal is every plan's saved and peak bytes within 10% of the prediction.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

import autopar
from autopar.runtime.memory import measure_step
from common import (LM_BATCH, LM_SEQ, SEED, WORKLOADS, WORLD, Workload, build,
                    run_on_processes, short_error)
from models import Bert, BertConfig

LEARNING_RATE = 1e-4
GOAL = 0.10
BERT_CONFIG = BertConfig(vocab_size=512, hidden=256, n_layers=2, n_heads=4, intermediate=1024,
                         max_position=LM_SEQ, n_labels=4)


def _bert_batch():
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, BERT_CONFIG.vocab_size, (LM_BATCH, LM_SEQ), generator=g)
    mask = torch.ones(LM_BATCH, LM_SEQ, dtype=torch.long)
    mask[:, LM_SEQ * 3 // 4:] = 0
    types = torch.zeros(LM_BATCH, LM_SEQ, dtype=torch.long)
    labels = torch.randint(0, BERT_CONFIG.n_labels, (LM_BATCH,), generator=g)
    return ids, mask, types, labels


_BERT = Workload(
    f"bert {BERT_CONFIG.n_layers}x{BERT_CONFIG.hidden}, {LM_BATCH}x{LM_SEQ} tokens",
    lambda: Bert(BERT_CONFIG), _bert_batch,
    megatron={"layers.*.attention.query.*": 0, "layers.*.attention.key.*": 0,
              "layers.*.attention.value.*": 0, "layers.*.attention.dense.weight": 1,
              "layers.*.intermediate.*": 0, "layers.*.output.weight": 1},
    mlp_layers={}, blocks_attr="layers")
MODELS = [w for w in WORKLOADS if not w.name.startswith("mlp")] + [_BERT]


# -- the plans -------------------------------------------------------------------------------------

def forced_plans(workload, model, batch) -> dict:
    """Plan name -> compile options for this model."""
    import inspect
    params = {fqn: p.shape for fqn, p in model.named_parameters()}
    inputs = list(inspect.signature(model.forward).parameters)[:len(batch)]
    split_batch = {name: "S(0)" for name in inputs}
    replicated = {fqn: "R" for fqn in params}
    sharded = {fqn: "S(0)" if shape[0] % WORLD == 0 else "R" for fqn, shape in params.items()}
    megatron = {glob: f"S({dim})" for glob, dim in workload.megatron.items()}
    dp = dict(mesh={"dp": WORLD}, constraints={**replicated, **split_batch})
    fsdp = dict(mesh={"dp": WORLD}, constraints={**replicated, **split_batch}, storage=sharded)
    return {
        "data parallel": dp,
        "sharded params": fsdp,
        "Megatron TP": dict(mesh={"tp": WORLD}, constraints={
            **replicated, **megatron, **{name: "R" for name in inputs}}),
        "dp, full recompute": dict(dp, recompute="full"),
        "dp, selective recompute": dict(dp, recompute="selective"),
        "dp, 2 micro-batches": dict(dp, micro_batches=2),
        "sharded, selective, 2 micro-batches": dict(fsdp, recompute="selective",
                                                    micro_batches=2),
        "automatic": {},
    }


# -- measuring (inside each process) ---------------------------------------------------------------

def measure_plan(workload, name, options, cluster) -> dict:
    row = {"model": workload.name, "plan": name}
    model, batch = build(workload), workload.batch()
    try:
        pm = autopar.compile(model, cluster, example_inputs=batch, **options)
        optimizer = torch.optim.AdamW(pm.parameters(), lr=LEARNING_RATE)
        for _ in range(2):
            pm.step(*batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        got = measure_step(pm, optimizer, *batch)
        measured = torch.tensor([got.held, got.saved, got.peak], dtype=torch.float64)
    except Exception as e:  # noqa: BLE001 - a plan that fails is a table row
        dist.barrier()
        return {**row, "error": short_error(e)}
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    plan, cost = pm.plan, pm.plan.cost
    choices = sorted(set(plan.recompute.values()) - {"none"}) or ["none"]
    row.update(mesh=" x ".join(f"{k}={v}" for k, v in plan.mesh.items()),
               recompute="/".join(choices), micro_batches=plan.micro_batches,
               held=measured[0].item(), saved=measured[1].item(), peak=measured[2].item(),
               predicted_held=cost.parameter_bytes + cost.gradient_bytes + cost.optimizer_bytes,
               predicted_saved=cost.activation_bytes,
               predicted_peak=cost.memory_bytes_per_device)
    return row


def measure_all() -> list:
    cluster = autopar.Cluster.local(WORLD, measure=False)
    torch.set_num_threads(1)
    rows = []
    for workload in MODELS:
        model, batch = build(workload), workload.batch()
        for name, options in forced_plans(workload, model, batch).items():
            rows.append(measure_plan(workload, name, options, cluster))
    return rows


# -- reporting (in the parent) ---------------------------------------------------------------------

def mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def error(measured: float, predicted: float) -> float:
    return (predicted - measured) / max(measured, 1.0)


def pair(r, key) -> str:
    e = error(r[key], r[f"predicted_{key}"])
    colour = "green" if abs(e) <= GOAL else "red"
    return f"{mib(r[key])} / {mib(r['predicted_' + key])} [{colour}]({e:+.1%})[/]"


def results_table(rows) -> Table:
    table = Table(title=f"measured / predicted MiB per device, {WORLD} gloo processes "
                        "(the largest over the ranks); (predicted - measured) / measured")
    for col in ("model", "plan", "mesh", "recompute", "micro-\nbatches",
                "held: params,\ngrads, optimizer", "saved for backward\n(first micro-batch)",
                "peak of the step"):
        table.add_column(col, overflow="fold")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], r["plan"], "", "", "", f"[red]{r['error']}", "", "")
            continue
        table.add_row(r["model"], r["plan"], r["mesh"], r["recompute"], str(r["micro_batches"]),
                      pair(r, "held"), pair(r, "saved"), pair(r, "peak"))
    return table


def summary(rows) -> list:
    done = [r for r in rows if "error" not in r]
    lines = [f"plans measured: {len(done)} of {len(rows)}"]
    for key in ("held", "saved", "peak"):
        errors = [abs(error(r[key], r[f"predicted_{key}"])) for r in done]
        if errors:
            within = sum(e <= GOAL for e in errors)
            lines.append(f"{key}: worst error {max(errors):.1%}, mean {sum(errors) / len(errors):.1%}"
                         f"; within {GOAL:.0%} in {within} of {len(errors)} plans")
    return lines


def main():
    start = time.perf_counter()
    console = Console(width=200)
    rows = run_on_processes(measure_all)
    console.print(results_table(rows))
    for line in summary(rows):
        console.print(line)
    console.print(f"finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
