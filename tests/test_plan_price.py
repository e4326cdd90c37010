"""The price a plan reports is the price of the program that runs, and the plan says how far
it may be from the best of its program.

- Folding plans one instance of a repeated block for many; the plan's cost must still be the
  cost of every instance priced on its own (:func:`autopar.search.reprice`), seconds and
  peak memory, where memory binds too: recomputation mixed per instance, several
  micro-batches, a LLaMA-3 70B shape on 64 H100s.
- ``plan.stats["optimality"]`` gives the solver's bound; no assignment of the program may
  step below it (checked against HiGHS's branch and bound run to its end), and each step
  that restricted the search is named.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

import autopar
from autopar import Cluster
from autopar.api import _plan
from autopar.options import Options
from autopar.search import reprice
from autopar.search.result import FOLDED, GREEDY, PRUNED, SUPPORT

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
from models import Llama, LlamaConfig  # noqa: E402

EXACT = 1e-9   # relative: the same sums, in another order

SMALL = LlamaConfig(vocab_size=512, dim=256, n_layers=8, n_heads=4, n_kv_heads=2,
                    hidden_dim=768, max_seq_len=256)


def planned(config, batch, seq, cluster, device="cpu", **options):
    with torch.device(device):
        model = Llama(config)
    tokens = torch.zeros(batch, seq, dtype=torch.long, device=device)
    return _plan(model, cluster, (tokens, tokens), Options(**options), program=False)


def assert_priced_unfolded(captured, ctx):
    plan = ctx.plan
    whole = reprice(captured.gm, ctx.mesh, ctx.cluster, ctx.options.training(), ctx.blocks,
                    plan.recompute)
    for part in ("total_s", "compute_s", "comm_s", "memory_bytes_per_device"):
        assert getattr(plan.cost, part) == pytest.approx(getattr(whole, part), rel=EXACT), part


@pytest.mark.parametrize("budget_mb, options, expect", [
    (None, {}, "plain"),
    (140, {}, "recompute mixed per instance"),
    (90, {}, "recompute, the ends apart"),
    (45, {}, "micro-batches"),
    (50, {"fold": False}, "unfolded"),
])
def test_the_reported_price_is_the_whole_program_priced_node_by_node(budget_mb, options,
                                                                      expect):
    budget = None if budget_mb is None else budget_mb * 1e6
    # unfolded, every layer is its own part of the problem: 4 layers of the model, whose
    # 158 MB a 50 MB budget binds
    config = dataclasses.replace(SMALL, n_layers=4) if expect == "unfolded" else SMALL
    captured, ctx = planned(config, 32, 256, Cluster.preset("dgx-a100"),
                            memory_budget_bytes=budget, **options)
    plan = ctx.plan
    if expect == "recompute mixed per instance":
        assert len(set(plan.recompute.values())) > 1, plan.recompute
    if expect == "micro-batches":
        assert plan.micro_batches > 1
    if budget is not None:
        assert plan.cost.memory_bytes_per_device <= budget
    assert_priced_unfolded(captured, ctx)


def test_a_llama_70b_shape_on_64_gpus_is_priced_as_its_whole_program():
    """LLaMA-3 70B's layer cut to 8 layers, 4 x 4096 tokens in fp32 on 8 DGX H100s (meta
    device): three-axis meshes, the folded plan priced as its 8 layers are."""
    config = LlamaConfig(vocab_size=128256, dim=8192, hidden_dim=28672, n_heads=64,
                         n_kv_heads=8, n_layers=8, max_seq_len=4096)
    captured, ctx = planned(config, 4, 4096, Cluster.preset("dgx-h100", nodes=8), "meta")
    assert_priced_unfolded(captured, ctx)
    # its program is pruned to be solved (too many pairs of strategies): no bound, said so
    optimality = ctx.plan.stats["optimality"]
    assert PRUNED in optimality["restricted"] and optimality["bound_s"] is None


def test_an_unconstrained_plan_is_proven_optimal_for_its_program():
    captured, ctx = planned(SMALL, 32, 256, Cluster.preset("dgx-a100"))
    o = ctx.plan.stats["optimality"]
    assert o["proven"] and o["gap"] == pytest.approx(0, abs=1e-9)
    assert o["bound_s"] == pytest.approx(ctx.plan.cost.total_s, rel=1e-9)
    assert o["restricted"][0] in FOLDED.values() and "alike" in o["scope"]


@pytest.mark.parametrize("budget_mb", [140, 55, 45])
def test_where_memory_binds_the_bound_is_below_the_plan_and_its_steps_are_named(budget_mb):
    captured, ctx = planned(SMALL, 32, 256, Cluster.preset("dgx-a100"),
                            memory_budget_bytes=budget_mb * 1e6)
    o = ctx.plan.stats["optimality"]
    assert o["bound_s"] is not None and o["bound_s"] <= o["plan_s"] * (1 + EXACT)
    assert 0 <= o["gap"] < 0.05
    assert o["plan_s"] == ctx.plan.cost.total_s
    assert any(r.startswith("branched only on") for r in o["restricted"])


def test_a_fast_plan_says_it_is_greedy_and_proves_nothing():
    captured, ctx = planned(SMALL, 32, 256, Cluster.preset("dgx-a100"), level="fast")
    o = ctx.plan.stats["optimality"]
    assert GREEDY in o["restricted"] and o["bound_s"] is None and not o["proven"]


def _llama_problem(layers: int):
    """The per-op problem of the small LLaMA cut to ``layers`` on a 2 x 4 mesh, unfolded."""
    from dataclasses import replace

    from autopar.cost.model import CostModel
    from autopar.passes import ANALYSIS, PassContext, run_passes
    from autopar.program.capture import capture
    from autopar.program.mesh import Mesh
    from autopar.search.problem import build_problem
    with torch.device("meta"):
        model = Llama(replace(SMALL, n_layers=layers))
    tokens = torch.zeros(32, 256, dtype=torch.long, device="meta")
    captured = capture(model, (tokens, tokens))
    ctx = PassContext(example_inputs=captured.example_inputs, input_names=captured.input_names)
    run_passes(captured.gm, ctx, ANALYSIS)
    mesh = Mesh(("dp", "tp"), (2, 4))
    return build_problem(captured.gm, mesh, CostModel(Cluster.preset("dgx-a100"), mesh), {})


def test_the_solver_bound_is_below_the_true_optimum_and_a_restricted_search_says_so(
        share=0.8):
    """Where memory binds (the relaxation fractional), solve's bound is at most the optimum
    HiGHS's branch and bound proves on the whole program, and its plan at least that; at
    80% of the unconstrained plan's memory the plan branched on the relaxation's support
    misses the optimum (by 0.2%), and says it was restricted."""
    from autopar.search import solver
    prob = _llama_problem(2)
    free = prob.evaluate(solver.solve(prob, 1e15).choice).memory_bytes_per_device
    budget = share * free
    solved = solver.solve(prob, budget)
    b, _, constant = solver._step_program(prob, budget, solver.TIME_LIMIT_S)
    whole = b.branch(solver.TIME_LIMIT_S)
    assert whole.status == "optimal"
    optimum = whole.fun + constant
    assert solved.bound <= optimum * (1 + 1e-4)       # HiGHS proves within its gap, 1e-4
    assert solved.objective >= optimum * (1 - 1e-4)
    assert solved.bound >= solver.relaxation_bound(prob, budget, 60) * (1 - 1e-9)
    assert SUPPORT in solved.restricted
    assert prob.evaluate(solved.choice).total_s == pytest.approx(solved.objective, rel=1e-9)


def test_a_pipelined_plan_says_how_far_each_stage_may_be_from_its_best():
    config = LlamaConfig(vocab_size=512, dim=256, n_layers=4, n_heads=4, n_kv_heads=2,
                         hidden_dim=768, max_seq_len=128)
    with torch.device("meta"):
        model = Llama(config)
    tokens = torch.zeros(8, 128, dtype=torch.long, device="meta")
    plan = autopar.plan(model, Cluster.local(4, measure=False), example_inputs=(tokens, tokens),
                        mesh={"pp": 2, "dp": 2}, schedule="1f1b", micro_batches=4)
    assert len(plan.stages) == 2
    for stage in plan.stages:
        o = stage["optimality"]
        assert o["plan_s"] == pytest.approx(stage["time_s"], rel=1e-12)
        assert o["bound_s"] is None or o["bound_s"] <= o["plan_s"] * (1 + EXACT)
