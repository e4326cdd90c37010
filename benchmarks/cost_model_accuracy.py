"""How well autopar's cost model predicts real step times on this machine.

For four models (a wide residual MLP, the GPT and the LLaMA of examples/models.py, and a
transformers LlamaForCausalLM from a small config with random weights) it compiles six plans
each for ``Cluster.local(n)`` (this machine's measured figures), forced through ``mesh=``,
``constraints=`` and the other pins, on n = 2 and n = 4 gloo processes:

- data parallel: every parameter stored replicated, the batch split (S(0));
- Megatron tensor parallel: attention and MLP weights split column- then row-wise, the batch
  and every other parameter replicated (on 4 processes, 2 x 2: the batch split on the other
  axis);
- sharded parameters (ZeRO-3/FSDP): every parameter stored split on dim 0, the batch split;
- full recomputation: data parallel, every block recomputed in backward;
- a pipeline: two stages (the rest of the processes splitting the batch in each), 1F1B over
  4 micro-batches;
- automatic: no mesh, no constraints.

Constraints pin how parameters and inputs are stored; the planner still picks every op's
layout, so the collectives column shows what each rank program actually does. Each plan trains
for real (spawned once per world size; one thread each): a few warm-up steps, then the
median of timed steps (``pm.step``: forward and backward; then the AdamW step), each between
barriers, the plans of one model taking turns so that drift in this machine's speed falls on
all of them alike. The table sets this against the plan's prediction
``pm.plan.cost.total_s`` and reports, per world size and over both, Spearman's rank
correlation, the median and worst absolute relative error, per model whether the plan
predicted fastest was the fastest (and how much slower it ran where not), and how much of
the shortfall grows with the number of collective calls a step makes (counted on an untimed
step).

    python benchmarks/cost_model_accuracy.py             # from the repository root, ~5 minutes
    python benchmarks/cost_model_accuracy.py --worlds 2  # 2 processes only
    python benchmarks/cost_model_accuracy.py --cached    # plan with Cluster.local()'s cached figures

By default it measures this machine afresh (into a temporary cache) rather than trusting
figures cached earlier: on a shared virtual machine they go stale.
"""

from __future__ import annotations

import hashlib
import inspect
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table
from scipy.stats import linregress, spearmanr

import autopar
from common import (SEED, WORKLOADS, Workload, barrier_s, build, collective_calls, collectives,
                    layouts, parse_args, run_planned_here, short_error, step_module,
                    sustained_rates, time_rows)

WORLDS = (2, 4)
WARMUP_STEPS = 3
ROUNDS = 4             # the plans of one model take turns, STEPS_PER_ROUND steps each time
STEPS_PER_ROUND = 3
LEARNING_RATE = 1e-4
HF_BATCH, HF_SEQ, HF_VOCAB = 4, 128, 512


# -- a transformers model ----------------------------------------------------------------------------

def _hf_llama():
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=HF_VOCAB, hidden_size=256, intermediate_size=768,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=HF_SEQ,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg)


def _hf_batch():
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, HF_VOCAB, (HF_BATCH, HF_SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}


HF_LLAMA = Workload(
    f"transformers llama 2x256, {HF_BATCH}x{HF_SEQ} tokens", _hf_llama, _hf_batch,
    megatron={"model.layers.*.self_attn.[qkv]_proj.weight": 0,
              "model.layers.*.self_attn.o_proj.weight": 1,
              "model.layers.*.mlp.gate_proj.weight": 0, "model.layers.*.mlp.up_proj.weight": 0,
              "model.layers.*.mlp.down_proj.weight": 1},
    mlp_layers={}, blocks_attr="model.layers")
MODELS = [*WORKLOADS, HF_LLAMA]


# -- the plans -------------------------------------------------------------------------------------

def input_names(model, batch) -> list:
    """The names of the forward arguments the batch fills, as constraints name inputs; none
    for keyword batches (a transformers model reads its inputs through ops that the planner
    places best itself)."""
    if isinstance(batch, dict):
        return []
    return list(inspect.signature(model.forward).parameters)[:len(batch)]


def forced_plans(workload, model, batch, world: int) -> dict:
    """Plan name -> compile options (mesh, constraints and other pins) for this model on
    ``world`` processes."""
    params = {fqn: p.shape for fqn, p in model.named_parameters()}
    inputs = input_names(model, batch)
    replicated = {fqn: "R" for fqn in params}
    split_batch = {name: "S(0)" for name in inputs}
    dp = dict(mesh={"dp": world}, constraints={**replicated, **split_batch})
    sharded = {fqn: "S(0)" if shape[0] % world == 0 else "R" for fqn, shape in params.items()}
    if world == 2:
        tp = dict(mesh={"tp": 2}, constraints={
            **replicated, **{g: f"S({d})" for g, d in workload.megatron.items()},
            **{name: "R" for name in inputs}})
    else:
        tp = dict(mesh={"dp": world // 2, "tp": 2}, constraints={
            **{f: "RR" for f in params},
            **{g: f"RS({d})" for g, d in workload.megatron.items()},
            **{name: "S(0)R" for name in inputs}})
    return {
        "data parallel": dp,
        "Megatron TP": tp,
        "sharded params": dict(dp, storage=sharded),
        "dp, full recompute": dict(dp, recompute="full"),
        "2 stages, 1F1B": dict(mesh={"pp": 2, "dp": world // 2}, schedule="1f1b",
                               micro_batches=4),
        "automatic": {},
    }


# -- measuring (inside each process) ---------------------------------------------------------------

def prepare(workload, name, options, cluster) -> tuple:
    """(table row, step function or None): the plan compiled, its prediction, and warm-up
    steps taken; a plan that fails says why in its row."""
    row = {"model": workload.name, "plan": name, "world": dist.get_world_size()}
    model, batch = build(workload), workload.batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pm = autopar.compile(model, cluster, example_inputs=batch, **options)
        except Exception as e:  # noqa: BLE001 - a plan that does not compile is a table row
            return {**row, "error": short_error(e)}, None
    row["warnings"] = sorted({str(w.message).split(";")[0] for w in caught})
    cost = pm.plan.cost
    row.update(mesh=" x ".join(f"{k}={v}" for k, v in pm.plan.mesh.items()),
               layouts=layouts(pm.plan), collectives=collectives(pm.code),
               program=program_key(pm),
               predicted_s=cost.total_s, compute_s=cost.compute_s, comm_s=cost.comm_s)
    optimizer = torch.optim.AdamW(pm.parameters(), lr=LEARNING_RATE)
    step = lambda: step_module(pm, optimizer, batch)  # noqa: E731
    try:
        for _ in range(WARMUP_STEPS - 1):
            step()
        row["collective_calls"] = collective_calls(step)  # the last warm-up step
    except Exception as e:  # noqa: BLE001
        return {**row, "error": short_error(e)}, None
    return row, step


def program_key(pm) -> str:
    """A hash of the rank program, its mesh axes named by position: plans that run the
    same program under other axis names share it."""
    code = pm.code
    for i, axis in enumerate(pm.plan.mesh):
        code = code.replace(repr(axis), f"'axis{i}'")
    return hashlib.sha1(code.encode()).hexdigest()


def measure_workload(workload, cluster, world: int) -> list:
    """Every plan of one model, timed in turns."""
    model, batch = build(workload), workload.batch()
    rows, steps = {}, {}
    for name, options in forced_plans(workload, model, batch, world).items():
        rows[name], step = prepare(workload, name, options, cluster)
        if step is not None:
            steps[name] = step
    return time_rows(rows, steps, ROUNDS, STEPS_PER_ROUND)


def measure_all() -> dict:
    """Every plan of every model, in the same order on every rank."""
    world = dist.get_world_size()
    cluster = autopar.Cluster.local(world)
    before = sustained_rates()
    rows = [row for workload in MODELS for row in measure_workload(workload, cluster, world)]
    device = cluster.devices()[0]
    planner = {"flops": device.flops_for("fp32"),
               "copy_bytes_per_s": device.memory_bandwidth_bytes_per_s}
    return {"rows": rows, "barrier_s": barrier_s(), "sustained": [before, sustained_rates()],
            "planner": planner}


# -- reporting (in the parent) ---------------------------------------------------------------------

def ms(t: float) -> str:
    return f"{t * 1e3:.1f}"


def results_table(rows, world: int) -> Table:
    steps = ROUNDS * STEPS_PER_ROUND
    table = Table(title=f"predicted vs measured training step, {world} gloo processes "
                        f"(median of {steps} steps after {WARMUP_STEPS} warm-up)")
    for col, justify in (("model", "left"), ("plan", "left"), ("mesh", "left"),
                         ("storage", "left"), ("collectives in the rank program", "left"),
                         ("collective\ncalls/step", "right"),
                         ("predicted ms\n(compute + comm)", "right"),
                         ("measured ms\n(min-max)", "right"), ("measured /\npredicted", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], r["plan"], r.get("mesh", ""), "", f"[red]{r['error']}",
                          "", "", "", "")
            continue
        table.add_row(
            r["model"], r["plan"], r["mesh"], r["layouts"], r["collectives"],
            str(r["collective_calls"]),
            f"{ms(r['predicted_s'])}\n({ms(r['compute_s'])} + {ms(r['comm_s'])})",
            f"{ms(r['measured_s'])}\n({ms(r['fastest_s'])}-{ms(r['slowest_s'])})",
            f"{r['measured_s'] / r['predicted_s']:.2f}")
    return table


def summary(rows, label: str) -> list:
    done = [r for r in rows if "error" not in r]
    if len(done) < 3:
        return [f"{label}: only {len(done)} plans ran; no statistics"]
    predicted = [r["predicted_s"] for r in done]
    measured = [r["measured_s"] for r in done]
    rho, p_value = spearmanr(predicted, measured)
    errors = [abs(p - m) / m for p, m in zip(predicted, measured)]
    under = sum(p < m for p, m in zip(predicted, measured))
    lines = [
        f"{label}: plans measured: {len(done)} of {len(rows)}",
        f"  Spearman rank correlation, predicted vs measured: {rho:.3f} (p = {p_value:.2g})",
        f"  absolute relative error |predicted - measured| / measured: median "
        f"{statistics.median(errors):.1%}, mean {statistics.mean(errors):.1%}, "
        f"worst {max(errors):.1%}",
        f"  predicted below measured in {under} of {len(done)} plans",
        "  " + overhead_fit(done)]
    groups = dict.fromkeys((r["world"], r["model"]) for r in done)
    lines += ["  " + picks(f"{model} on {world}", [r for r in done if (r["world"], r["model"])
                                                   == (world, model)])
              for world, model in groups]
    return lines + noise_floor(done)


def noise_floor(rows) -> list:
    """Plans of one model that compile to the same rank program, measured apart: how far
    this machine's noise alone moves a step time."""
    same = {}
    for r in rows:
        same.setdefault((r["world"], r["model"], r["program"]), []).append(r)
    lines = []
    for (world, model, _), twins in same.items():
        if len(twins) > 1:
            times = [r["measured_s"] for r in twins]
            lines.append(f"  noise: {model} on {world}: "
                         f"{' and '.join(r['plan'] for r in twins)} are one program, measured "
                         f"{max(times) / min(times) - 1:.0%} apart")
    return lines


def overhead_fit(rows) -> str:
    """How much of the shortfall the number of collective calls explains: a least-squares
    line through (calls per step, measured - predicted)."""
    calls = [r["collective_calls"] for r in rows]
    missed_ms = [(r["measured_s"] - r["predicted_s"]) * 1e3 for r in rows]
    if len(set(calls)) < 2:
        return "every plan makes as many collective calls: no fit"
    fit = linregress(calls, missed_ms)
    return (f"measured - predicted ~ {fit.intercept:.1f} ms + {fit.slope:.2f} ms per collective "
            f"call (least squares over the plans, r = {fit.rvalue:.2f})")


def picks(model, rows) -> str:
    """Whether the plan predicted fastest for ``model`` was the one measured fastest."""
    predicted = min(rows, key=lambda r: r["predicted_s"])
    measured = min(rows, key=lambda r: r["measured_s"])
    if predicted is measured:
        return f"{model}: the plan predicted fastest ({predicted['plan']}) was measured fastest"
    if predicted["program"] == measured["program"]:
        return (f"{model}: the plan predicted fastest ({predicted['plan']}) is the same program "
                f"as the one measured fastest ({measured['plan']})")
    slower = predicted["measured_s"] / measured["measured_s"] - 1
    return (f"{model}: predicted fastest {predicted['plan']}, measured fastest "
            f"{measured['plan']}; the predicted pick ran {slower:.0%} slower")


def sustained_line(planner, sustained) -> str:
    """What each process sustained, before and after the runs, beside the planner's figures."""
    rates = " and ".join(f"{r['flops'] / 1e9:.1f} GFLOP/s, {r['copy_bytes_per_s'] / 1e9:.1f} "
                         f"GB/s" for r in sustained)
    return (f"each process sustained (matmul, copy; median, all ranks at once; before and after "
            f"the runs): {rates}; the planner took {planner['flops'] / 1e9:.1f} GFLOP/s, "
            f"{planner['copy_bytes_per_s'] / 1e9:.1f} GB/s")


def main(argv=None):
    args = parse_args(argv, __doc__, worlds=WORLDS)
    start = time.perf_counter()
    console = Console(width=200)
    every = []
    for world in args.worlds:
        result = run_planned_here(console, measure_all, args.cached, world)
        rows = result["rows"]
        every += rows
        console.print(results_table(rows, world))
        for line in summary(rows, f"{world} processes"):
            console.print(line)
        console.print(f"one gloo barrier (carried by every timed step): "
                      f"{result['barrier_s'] * 1e6:.0f} us")
        console.print(sustained_line(result["planner"], result["sustained"]))
        notes = sorted({w for r in rows for w in r.get("warnings", [])})
        for note in notes:
            console.print(f"[yellow]warning while planning:[/] {note}")
    if len(args.worlds) > 1:
        for line in summary(every, "every world size"):
            console.print(line)
    console.print(f"finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
