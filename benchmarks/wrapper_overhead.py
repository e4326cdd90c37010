"""What the ParallelModule wrapper costs against calling its rank program directly.

For each model of the runtime benchmarks (a wide residual MLP, the GPT and the LLaMA of
examples/models.py) it compiles the automatic plan for ``Cluster.local(2)`` and trains on 2
gloo processes three ways, in turns so that drift in this machine's speed falls on all of
them alike:

- ``pm(*batch)`` then ``loss.backward()``: the module called as one device's model is;
- ``pm.step(*batch)``: the training step (forward and backward, the loss alone);
- the rank program (``pm.rank_program()``, an ``fx.GraphModule``) called directly on the
  inputs after activating its device mesh, then ``loss.backward()``: what the wrapper wraps.

Each is followed by the same AdamW step. The table gives the median step and its spread
(fastest-slowest of the timed steps) and each way's median over the direct call's: a ratio
within the spread is no measurable cost. Below it, the wrapper's own work per call
(flattening and checking the inputs), timed alone.

    python benchmarks/wrapper_overhead.py      # from the repository root, about a minute
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch
from rich.console import Console
from rich.table import Table

import autopar
from autopar.runtime import collectives, faults
from common import WORKLOADS, build, interleaved_times, parse_args, run_planned_here

WARMUP_STEPS = 2
ROUNDS = 6
STEPS_PER_ROUND = 3
LEARNING_RATE = 1e-4


def _ways(pm, optimizer, batch) -> dict:
    """Name -> one training step taken that way."""
    program = pm.rank_program()
    loss_at = pm._loss_index()

    def finish():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def called():
        pm(*batch).backward()
        finish()

    def stepped():
        pm.step(*batch)
        finish()

    def direct():
        # what ParallelModule._run does on one micro-batch, without its input checks
        collectives.set_active_mesh(pm._device_mesh)
        faults.set_active(pm._epoch)
        program(*batch)[loss_at].backward()
        finish()

    return {"pm(*batch)": called, "pm.step(*batch)": stepped, "rank program": direct}


def measure() -> list:
    warnings.filterwarnings("ignore")
    cluster = autopar.Cluster.local(2)
    rows = []
    for workload in WORKLOADS:
        model, batch = build(workload), workload.batch()
        pm = autopar.compile(model, cluster, example_inputs=batch)
        optimizer = torch.optim.AdamW(pm.parameters(), lr=LEARNING_RATE)
        ways = _ways(pm, optimizer, batch)
        for way in ways.values():
            for _ in range(WARMUP_STEPS):
                way()
        times = interleaved_times(ways, ROUNDS, STEPS_PER_ROUND)
        for name, ts in times.items():
            rows.append({"model": workload.name, "way": name, "median_s": statistics.median(ts),
                         "fastest_s": min(ts), "slowest_s": max(ts),
                         "own_s": _own_work_s(pm, batch)})
    return rows


def _own_work_s(pm, batch, calls: int = 1000) -> float:
    """Seconds per call of what the wrapper does beside the program: flattening and
    checking the inputs against the plan."""
    start = time.perf_counter()
    for _ in range(calls):
        inputs = pm._captured.flatten_inputs(batch, {})
        pm._check_inputs(inputs, pm._program.input_shapes)
    return (time.perf_counter() - start) / calls


def main(argv=None):
    args = parse_args(argv, __doc__)
    start = time.perf_counter()
    console = Console(width=160)
    rows = run_planned_here(console, measure, args.cached)
    table = Table(title="a training step through the wrapper and through the rank program, "
                        f"2 gloo processes (median of {ROUNDS * STEPS_PER_ROUND} steps)")
    for col in ("model", "called as", "median ms", "fastest-slowest ms", "/ rank program"):
        table.add_column(col, justify="left" if col in ("model", "called as") else "right")
    direct = {r["model"]: r["median_s"] for r in rows if r["way"] == "rank program"}
    for r in rows:
        table.add_row(r["model"], r["way"], f"{r['median_s'] * 1e3:.1f}",
                      f"{r['fastest_s'] * 1e3:.1f}-{r['slowest_s'] * 1e3:.1f}",
                      f"{r['median_s'] / direct[r['model']]:.3f}")
    console.print(table)
    for model in direct:
        own = next(r["own_s"] for r in rows if r["model"] == model)
        console.print(f"{model}: the wrapper's own work per call (flattening and checking "
                      f"the inputs), {own * 1e6:.0f} us: {own / direct[model]:.2%} of a step")
    console.print(f"finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
