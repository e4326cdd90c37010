"""Recomputation as a planning choice: chosen only where memory binds, priced as it runs
(the folded plan's price is the plan re-priced block by block), pins by glob, and the cost
model of a step run as micro-batches."""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))

import autopar  # noqa: E402
from autopar import Cluster, PlanError  # noqa: E402
from autopar.cost.model import CostModel, Training  # noqa: E402
from autopar.options import Options  # noqa: E402
from autopar.program.mesh import Mesh  # noqa: E402
from models import Llama, LlamaConfig  # noqa: E402

CLUSTER = Cluster.preset("dgx-a100", nodes=1)
MESH = {"dp": 4, "tp": 2}   # where the tighter budgets below plan best


def meta_llama(layers=6, dim=512, batch=8, seq=1024):
    with torch.device("meta"):
        model = Llama(LlamaConfig(vocab_size=8192, max_seq_len=seq, dim=dim, hidden_dim=4 * dim,
                                  n_heads=8, n_kv_heads=4, n_layers=layers))
    tokens = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    return model, (tokens, tokens)


def plan(model, example, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return autopar.plan(model, CLUSTER, example_inputs=example, **options)


@functools.lru_cache(maxsize=None)
def free_plan():
    model, example = meta_llama()
    return plan(model, example)


def choices(p) -> set:
    return set(p.recompute.values())


def test_ample_memory_recomputes_nothing():
    p = free_plan()
    assert list(p.recompute) == [f"layers.{i}" for i in range(6)]
    assert choices(p) == {"none"}
    # nothing recomputed: the only transients are the loss's, as backward enters it (two
    # copies of this rank's share of the logits' gradient), and the caller's batch (tokens
    # and labels, int64, whole)
    (loss,) = [v for v in p.nodes.values() if v["op"] == "cross_entropy"]
    split = math.prod(p.mesh[a] for a, q in zip(p.mesh, loss["inputs"][0])
                      if isinstance(q, autopar.Shard))
    logits_bytes = 8 * 1024 * 8192 * 4
    batch_bytes = 2 * 8 * 1024 * 8
    assert p.cost.transient_bytes == pytest.approx(2 * logits_bytes / split + batch_bytes,
                                                   rel=1e-9)


def test_the_peak_is_the_sum_of_its_parts():
    """At the larger of its two points: the forward pass at its most, the end of backward."""
    c = free_plan().cost
    static = c.parameter_bytes + c.gradient_bytes + c.optimizer_bytes
    forward = static + c.activation_bytes + c.transient_bytes
    assert max(forward, static + c.bucket_bytes) == \
        pytest.approx(c.memory_bytes_per_device, rel=1e-9)
    assert c.optimizer_bytes == pytest.approx(2 * c.gradient_bytes, rel=1e-9)   # AdamW, fp32
    assert c.activation_bytes > 0


def test_a_binding_budget_recomputes_and_fits():
    """A budget the plan without recomputation barely meets (or cannot): the planner
    recomputes, stays within the budget, and is no slower than the best plan that does not
    recompute."""
    model, example = meta_llama()
    budget = 0.6 * free_plan().cost.memory_bytes_per_device
    p = plan(model, example, memory_budget_bytes=budget, mesh=MESH, micro_batches=1)
    assert choices(p) - {"none"}
    assert p.cost.memory_bytes_per_device <= budget
    try:
        without = plan(model, example, memory_budget_bytes=budget, recompute="none", mesh=MESH,
                       micro_batches=1)
    except PlanError:
        return
    assert p.cost.total_s <= without.cost.total_s


def test_a_budget_selective_cannot_meet_takes_full_recomputation():
    model, example = meta_llama()
    budget = 0.45 * free_plan().cost.memory_bytes_per_device
    p = plan(model, example, memory_budget_bytes=budget, mesh=MESH)
    assert "full" in choices(p)
    assert p.cost.memory_bytes_per_device <= budget
    with pytest.raises(autopar.NoFit, match="no plan fits"):
        plan(model, example, memory_budget_bytes=budget, recompute="selective", mesh=MESH,
             micro_batches=1)


def test_recomputation_costs_time_and_saves_memory_in_order():
    model, example = meta_llama()
    mesh = free_plan().mesh
    by = {c: plan(model, example, mesh=mesh, recompute=c).cost for c in
          ("none", "selective", "full")}
    assert by["none"].total_s < by["selective"].total_s < by["full"].total_s
    assert by["none"].activation_bytes > by["selective"].activation_bytes > \
        by["full"].activation_bytes
    # full recomputation runs about one more forward pass: under 50% more time
    assert by["full"].total_s < 1.5 * by["none"].total_s


def test_pins_by_glob_leave_the_rest_to_the_planner():
    model, example = meta_llama()
    p = plan(model, example, recompute={"layers.[12]": "full", "layers.5": "selective"})
    assert p.recompute == {"layers.0": "none", "layers.1": "full", "layers.2": "full",
                           "layers.3": "none", "layers.4": "none", "layers.5": "selective"}
    text = p.explain()
    assert "recompute: layers.0 none; layers.1-layers.2 (2 blocks) full" in text
    assert "memory per device at the forward pass's peak: parameters" in text
    assert autopar.Plan.from_json(p.to_json()).recompute == p.recompute


def test_bad_recompute_requests_name_the_value_and_the_choices():
    model, example = meta_llama(layers=3)
    with pytest.raises(PlanError, match=r"'sometimes'.*none, selective, full"):
        plan(model, example, recompute="sometimes")
    with pytest.raises(PlanError, match=r"'h\.\*' matches no block; the blocks are "
                                        r"'layers.0', 'layers.1', 'layers.2'"):
        plan(model, example, recompute={"h.*": "full"})


def test_the_folded_price_is_the_plan_repriced_block_by_block():
    """Instances of one folded block taking different choices are priced by their shares;
    re-pricing the chosen plan on the unfolded program, each block with its own choice,
    gives the same seconds and memory."""
    from autopar.api import _plan
    from autopar.search.pricing import Facts
    from autopar.search.problem import build_problem
    from autopar.search.recompute import Recompute
    model, example = meta_llama()
    pins = {"layers.[0-2]": "full", "layers.[345]": "selective"}
    budget = 0.8 * free_plan().cost.memory_bytes_per_device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured, ctx = _plan(model, CLUSTER, example,
                              Options(memory_budget_bytes=budget, recompute=pins), program=False)
    p = ctx.plan
    cost_model = CostModel(CLUSTER, ctx.mesh, Training())
    facts = Facts()
    prob = build_problem(captured.gm, ctx.mesh, cost_model, {}, facts=facts)
    prob = Recompute(p.recompute, ctx.blocks).apply(prob, facts)
    choice = {n: prob.options[n].index(n.meta["autopar.strategy"]) for n in prob.nodes}
    again = prob.evaluate(choice)
    assert again.total_s == pytest.approx(p.cost.total_s, rel=1e-9)
    assert again.memory_bytes_per_device == pytest.approx(p.cost.memory_bytes_per_device,
                                                          rel=1e-9)


def test_a_step_of_micro_batches_runs_its_program_that_many_times():
    """Priced on one micro-batch's program: ops and moves run m times a step, the optimizer
    and the bucketed gradient sums of parameters once."""
    mesh = Mesh(("dp",), (8,))
    one = CostModel(CLUSTER, mesh, Training())
    four = CostModel(CLUSTER, mesh, Training(micro_batches=4))
    r = (autopar.Replicate(),)
    assert four.compute_s("linear", 1e12, 1e8, [r], r) == pytest.approx(
        4 * one.compute_s("linear", 1e12, 1e8, [r], r))
    assert four.optimizer_s(1e8, True, 4) == one.optimizer_s(1e8, True, 4)
    assert four.redistribute_s(1e8, (autopar.Shard(0),), r) == pytest.approx(
        4 * one.redistribute_s(1e8, (autopar.Shard(0),), r))
    assert four.grad_sum_s(1e8, r, 0, fused=False, bucketed=True) == pytest.approx(
        one.grad_sum_s(1e8, r, 0, fused=False, bucketed=True))
    assert four.grad_sum_s(1e8, r, 0, fused=False) == pytest.approx(
        4 * one.grad_sum_s(1e8, r, 0, fused=False))


# -- micro-batches chosen by the planner --------------------------------------------------------

WIDE = dict(layers=4, dim=256, batch=16, seq=1024)   # activations are most of the memory
DP = {"dp": 8}


@functools.lru_cache(maxsize=None)
def wide_free_plan():
    model, example = meta_llama(**WIDE)
    return plan(model, example, mesh=DP)


def test_ample_memory_keeps_one_micro_batch():
    assert wide_free_plan().micro_batches == 1


def test_a_budget_one_micro_batch_cannot_meet_takes_more():
    """Where one micro-batch does not fit even with every block recomputed in full, the
    planner takes more micro-batches; where full recomputation of one fits too, it keeps
    whichever steps faster (micro-batches hold the step's gradients apart between them,
    recomputation runs the forward pass again)."""
    model, example = meta_llama(**WIDE)
    free = wide_free_plan().cost.memory_bytes_per_device
    budget = 0.4 * free
    p = plan(model, example, mesh=DP, memory_budget_bytes=budget)
    with pytest.raises(autopar.NoFit):
        plan(model, example, mesh=DP, memory_budget_bytes=budget, micro_batches=1)
    assert p.micro_batches > 1
    assert p.cost.memory_bytes_per_device <= budget
    assert p.cost.transient_bytes > 0          # the gradients held between micro-batches
    assert "micro-batches: " + str(p.micro_batches) in p.explain()
    # room for one micro-batch with every block recomputed in full, and not without
    full = plan(model, example, mesh=DP, recompute="full", micro_batches=1)
    room = 1.01 * full.cost.memory_bytes_per_device
    roomier = plan(model, example, mesh=DP, memory_budget_bytes=room)
    one = plan(model, example, mesh=DP, memory_budget_bytes=room, micro_batches=1)
    two = plan(model, example, mesh=DP, memory_budget_bytes=room, micro_batches=2)
    assert "full" in choices(one)
    assert roomier.cost.memory_bytes_per_device <= room
    assert roomier.micro_batches in (1, 2)
    assert roomier.cost.total_s <= min(one.cost.total_s, two.cost.total_s) * (1 + 1e-9)


def test_no_plan_even_with_micro_batches_of_one_sample_names_the_smallest():
    model, example = meta_llama(**WIDE)
    budget = 0.05 * wide_free_plan().cost.memory_bytes_per_device
    with pytest.raises(autopar.NoFit, match=r"even with every block recomputed in full and "
                                            r"micro-batches of one sample \(16 a step\): "
                                            r"every plan needs at least [\d.]+ MiB\. Add "
                                            r"devices") as e:
        plan(model, example, mesh=DP, memory_budget_bytes=budget)
    assert e.value.smallest_bytes > budget
    with pytest.raises(autopar.NoFit) as pinned:
        plan(model, example, mesh=DP, memory_budget_bytes=budget, micro_batches=1)
    assert "micro-batches of one sample" not in str(pinned.value)
    assert pinned.value.smallest_bytes > e.value.smallest_bytes   # more micro-batches help


def test_the_peak_where_backward_enters_the_loss_binds_the_plan(monkeypatch):
    """As backward enters the loss, everything saved is alive beside two copies of this
    rank's share of the logits' gradient. Under a budget that the fastest plan meets only
    when that point is ignored, the planner picks another plan that fits with it."""
    import autopar.search.problem as problem
    model, example = meta_llama(**WIDE)
    ample = 1e15
    free = plan(model, example, mesh=DP, memory_budget_bytes=ample)
    monkeypatch.setattr(problem, "GRADIENT_COPIES", {})
    blind = plan(model, example, mesh=DP, memory_budget_bytes=ample)
    monkeypatch.undo()
    # equally fast assignments (where several tie, either may come first), priced without
    # and with the loss's point
    assert blind.cost.total_s == pytest.approx(free.cost.total_s, rel=1e-12)
    budget = blind.cost.memory_bytes_per_device
    assert free.cost.memory_bytes_per_device > budget * 1.05
    p = plan(model, example, mesh=DP, memory_budget_bytes=budget)
    assert p.cost.memory_bytes_per_device <= budget
    assert (p.recompute, p.micro_batches, p.placements) != \
        (free.recompute, free.micro_batches, free.placements)
