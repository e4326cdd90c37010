"""The planner finds the known optimum: data parallel for a small model on a large batch,
Megatron tensor parallel for wide layers on a tiny batch, tensor parallel inside nodes when
links between nodes are slow, sharded parameters when replicas do not fit; it is never
predicted slower than forced baselines; the fast and exact levels agree where they should."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import autopar
from autopar import Cluster, PlanError, Replicate, Shard, format_layout


class Net(nn.Module):
    """Residual MLP blocks returning a scalar loss (as training does)."""

    def __init__(self, d, h, layers=1):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
                                    for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x.pow(2).mean()


def meta_net(d, h, layers=1):
    with torch.device("meta"):
        return Net(d, h, layers)


def batch(n, d):
    return (torch.empty(n, d, device="meta"),)


def linears(plan):
    return [v for v in plan.nodes.values() if v["op"] == "linear"]


def test_small_model_large_batch_is_data_parallel():
    plan = autopar.plan(meta_net(64, 256), Cluster.preset("dgx-a100"),
                        example_inputs=batch(2**20, 64))
    every_axis_batch = tuple(Shard(0) for _ in plan.mesh)
    for lin in linears(plan):
        x, w = lin["inputs"][:2]
        assert x == every_axis_batch and lin["output"] == every_axis_batch
        assert all(p == Replicate() for p in w), f"weights used whole, got {format_layout(w)}"


def test_wide_layers_tiny_batch_is_megatron_tensor_parallel():
    plan = autopar.plan(meta_net(8192, 32768), Cluster.preset("dgx-a100"),
                        example_inputs=batch(8, 8192))
    fc1 = plan.placements["layers.0.0.weight"]
    fc2 = plan.placements["layers.0.2.weight"]
    assert all(p == Shard(0) for p in fc1), format_layout(fc1)    # column parallel
    assert all(p == Shard(1) for p in fc2), format_layout(fc2)    # row parallel
    first, second = linears(plan)
    assert all(p == Replicate() for p in first["inputs"][0])      # activations not split
    assert all(p == Shard(1) for p in first["output"])


def test_tensor_parallel_stays_inside_nodes_when_links_between_nodes_are_slow():
    cluster = Cluster.preset("dgx-a100", nodes=2, devices_per_node=4)
    plan = autopar.plan(meta_net(1024, 4096, 2), cluster, example_inputs=batch(16384, 1024))
    assert list(plan.mesh.values()) == [2, 4]     # outer axis across nodes, inner inside
    for lin in linears(plan):
        x, w = lin["inputs"][:2]
        assert x[0] == Shard(0) and lin["output"][0] == Shard(0)   # data parallel across
        assert w[0] == Replicate() and isinstance(w[1], Shard)     # weights split inside


def test_memory_budget_forces_sharded_parameters():
    model, x = meta_net(1024, 4096, 4), batch(1024, 1024)
    cluster = Cluster.preset("dgx-a100")
    free = autopar.plan(model, cluster, example_inputs=x, mesh={"dp": 8},
                        constraints={"*": "R"})
    budget = free.cost.memory_bytes_per_device / 3
    plan = autopar.plan(model, cluster, example_inputs=x, memory_budget_bytes=budget)
    assert plan.cost.memory_bytes_per_device <= budget
    for name, layout in plan.placements.items():
        if name.endswith("weight"):
            assert any(isinstance(p, Shard) for p in layout), f"{name} {format_layout(layout)}"


def test_infeasible_budget_names_the_smallest_memory_any_plan_needs():
    with pytest.raises(PlanError, match=r"every plan needs at least [\d.]+ MiB.*Add devices"):
        autopar.plan(meta_net(1024, 4096, 4), Cluster.preset("dgx-a100"),
                     example_inputs=batch(1024, 1024), memory_budget_bytes=1e6)


@pytest.mark.parametrize("case", ["dp", "tp", "dpxtp"])
def test_automatic_plan_never_predicted_slower_than_baselines(case):
    model, x = {"dp": (meta_net(64, 256), batch(2**16, 64)),
                "tp": (meta_net(4096, 16384), batch(8, 4096)),
                "dpxtp": (meta_net(1024, 4096, 2), batch(4096, 1024))}[case]
    cluster = Cluster.preset("dgx-a100", nodes=2, devices_per_node=4)
    auto = autopar.plan(model, cluster, example_inputs=x)
    data_parallel = autopar.plan(model, cluster, example_inputs=x, mesh={"dp": 8},
                                 constraints={"*": "R"})
    megatron = autopar.plan(model, cluster, example_inputs=x, mesh={"tp": 8},
                            constraints={"*.0.weight": "S(0)", "*.0.bias": "S(0)",
                                         "*.2.weight": "S(1)"})
    assert auto.cost.total_s <= data_parallel.cost.total_s * (1 + 1e-9)
    assert auto.cost.total_s <= megatron.cost.total_s * (1 + 1e-9)


@pytest.mark.parametrize("d,h,n", [(64, 256, 2**16), (4096, 16384, 8), (256, 1024, 512)])
def test_exact_level_is_never_worse_than_fast(d, h, n):
    cluster = Cluster.preset("dgx-h100", devices_per_node=4)
    fast = autopar.plan(meta_net(d, h, 2), cluster, example_inputs=batch(n, d), level="fast")
    full = autopar.plan(meta_net(d, h, 2), cluster, example_inputs=batch(n, d), level="full")
    assert full.cost.total_s <= fast.cost.total_s * (1 + 1e-9)


def test_exact_objective_equals_the_evaluated_cost_of_its_plan():
    plan = autopar.plan(meta_net(1024, 4096, 2), Cluster.preset("dgx-a100", nodes=2,
                                                               devices_per_node=4),
                        example_inputs=batch(4096, 1024))
    for mesh, m in plan.stats["meshes"].items():
        if m["exact_objective_s"] is not None and m["predicted_step_s"] == plan.cost.total_s:
            assert m["exact_objective_s"] == pytest.approx(plan.cost.total_s, rel=1e-6)
            break
    else:
        raise AssertionError(f"no exact solution chose the plan: {plan.stats['meshes']}")


def test_plans_are_deterministic():
    model, x = meta_net(1024, 4096, 2), batch(4096, 1024)
    cluster = Cluster.preset("dgx-a100", nodes=2, devices_per_node=4)
    a = autopar.plan(model, cluster, example_inputs=x)
    b = autopar.plan(model, cluster, example_inputs=x)
    assert a.fingerprint() == b.fingerprint() and a.to_json() != ""


def test_plan_reports_cost_stats_and_explains():
    plan = autopar.plan(meta_net(1024, 4096, 2), Cluster.preset("dgx-a100"),
                        example_inputs=batch(4096, 1024))
    c = plan.cost
    assert c.total_s == pytest.approx(c.compute_s + c.comm_s)
    assert c.memory_bytes_per_device > 0
    seconds = plan.stats["seconds"]
    assert {"capture", "annotate_shapes", "assign_layouts", "total"} <= set(seconds)
    searched = len(plan.stats["meshes"]) + len(plan.stats.get("meshes_skipped", []))
    assert searched == 4                                   # 8 = 8, 2x4, 4x2, 2x2x2
    text = plan.explain(per="op")
    assert "linear" in text and "compute" in text
    again = autopar.Plan.from_json(plan.to_json())
    assert again.cost == plan.cost


def test_planning_prints_nothing_off_a_terminal(capfd):
    autopar.plan(meta_net(1024, 4096, 2), Cluster.preset("dgx-a100"),
                 example_inputs=batch(4096, 1024))
    out, err = capfd.readouterr()
    assert out == "" and "planning" not in err


def _mlp_problem():
    """The per-op problem of two residual MLP blocks (width 256, batch 64) on a 2 x 2 mesh."""
    from autopar.program.capture import capture
    from autopar.cost.model import CostModel
    from autopar.program.mesh import Mesh
    from autopar.passes import ANALYSIS, PassContext, run_passes
    from autopar.search.problem import build_problem
    captured = capture(meta_net(256, 1024, 2), batch(64, 256))
    ctx = PassContext(example_inputs=captured.example_inputs, input_names=captured.input_names)
    run_passes(captured.gm, ctx, ANALYSIS)
    mesh = Mesh(("dp", "tp"), (2, 2))
    return build_problem(captured.gm, mesh, CostModel(Cluster.preset("dgx-a100"), mesh), {})


def test_peak_memory_sweep_equals_the_largest_checkpoint():
    prob = _mlp_problem()
    for k in range(4):   # a few different assignments, chosen deterministically
        choice = {n: (i * 7 + k) % len(prob.options[n]) for i, n in enumerate(prob.nodes)}
        every = max(max(prob.memory_at(choice, t) for t in range(len(prob.nodes))),
                    prob.memory_after_backward(choice))
        assert prob.peak_memory(choice) == pytest.approx(every, rel=1e-12)


def test_the_memory_floor_is_below_every_assignment_and_refuses_a_budget_under_it(
        monkeypatch):
    """memory_budget's floor (per checkpoint, each term's least over its strategies) is
    below the peak of every assignment, the least of them included (min_memory); a budget
    under it is refused as Infeasible before any solve."""
    from autopar.search import solver
    prob = _mlp_problem()
    b = solver._Builder()
    xs = solver.strategy_variables(b, prob)
    pairs = {}
    solver.edge_marginals(b, prob, xs, pairs)
    floor = solver.memory_budget(b, prob, xs, 1e12, pairs).max()
    least = solver.min_memory(prob)
    assert 0 < floor <= least * (1 + 1e-9)
    # found without the program (edges at their least pair, allowed or not): no higher
    assert 0 < solver.memory_floor(prob) <= floor * (1 + 1e-12)
    for k in range(4):
        choice = {n: (i * 7 + k) % len(prob.options[n]) for i, n in enumerate(prob.nodes)}
        assert floor <= prob.peak_memory(choice) * (1 + 1e-9)
    solver.solve(prob, least * 1.01)   # above the least any assignment needs: a plan

    def no_solve(*args, **kwargs):
        raise AssertionError("HiGHS ran")
    monkeypatch.setattr(solver, "run", no_solve)
    with pytest.raises(solver.Infeasible):   # refused without running HiGHS
        solver.solve(prob, floor * 0.99)


def test_a_mesh_no_plan_fits_is_refused_before_any_search(monkeypatch):
    """Under the memory floor of a mesh's problem, planning on it builds no solver program
    and runs no greedy plan: the plan call says nothing fits."""
    from autopar.search import meshes

    def searched(*args, **kwargs):
        raise AssertionError("searched a mesh where nothing fits")
    monkeypatch.setattr(meshes, "solve", searched)
    monkeypatch.setattr(meshes, "propagate", searched)
    with pytest.raises(autopar.NoFit):
        autopar.plan(meta_net(256, 1024, 2), Cluster.preset("dgx-a100"),
                     example_inputs=batch(64, 256), memory_budget_bytes=2**16, micro_batches=1,
                     mesh={"dp": 2, "tp": 4})


def test_a_saved_copy_read_alone_equals_its_entry_of_the_whole_table():
    """Evaluating an assignment reads each edge's saved bytes one entry at a time
    (Edge.saved_at); the solver's memory rows read the whole table (saved_matrix)."""
    prob = _mlp_problem()
    saved = [e for e in prob.edges if e.saved_bytes]
    assert saved
    nonzero = 0
    for e in saved:
        alone = [[e.saved_at(prob.prices, s, d) for d in range(len(e.dst_keys))]
                 for s in range(len(e.src_keys))]
        _, src_of, _, dst_of = e.distinct
        table = e.saved_matrix(prob.prices)
        assert alone == [[table[src_of[s], dst_of[d]] for d in range(len(e.dst_keys))]
                         for s in range(len(e.src_keys))]
        nonzero += sum(v > 0 for row in alone for v in row)
    assert nonzero


@pytest.mark.parametrize("width, rows", [(4096, 64), (512, 4096)])
def test_meshes_dropped_at_their_bound_lose_nothing(width, rows):
    """The search stops a mesh's program at its relaxation's bound once a better plan is in
    hand; the plan it returns is still the best of every mesh planned on its own."""
    net, cluster = meta_net(width, 4 * width, layers=2), Cluster.preset("dgx-a100", nodes=2)
    plan = autopar.plan(net, cluster, example_inputs=batch(rows, width))
    dropped = [m for m in plan.stats["meshes"].values() if m["predicted_step_s"] is None]
    each = {}
    for name in plan.stats["meshes"]:
        each[name] = autopar.plan(net, cluster, example_inputs=batch(rows, width),
                                  mesh=_axes(name)).cost.total_s
    assert plan.cost.total_s == pytest.approx(min(each.values()), rel=1e-9)
    for name, m in plan.stats["meshes"].items():
        if m["predicted_step_s"] is None:
            assert m["lower_bound_s"] <= each[name] * (1 + 1e-9)
    assert dropped, "no mesh was dropped: the bound is not exercised"


def _axes(name: str) -> dict:
    sizes = [int(v) for v in re.findall(r"\d+", name)]
    return dict(zip({1: ("dp",), 2: ("dp", "tp"), 3: ("dp", "sp", "tp")}[len(sizes)], sizes))


@pytest.mark.parametrize("width, rows", [(512, 4096), (1024, 4096)])
def test_three_axis_meshes_are_searched_where_a_mesh_they_refine_came_close(width, rows):
    """A mesh (a, b, c) is planned only where (a*b, c) or (a, b*c) planned (or was bounded)
    within THREE_AXIS_MARGIN of the best; those skipped plan no better on their own here."""
    from autopar.search.meshes import THREE_AXIS_MARGIN
    net, cluster = meta_net(width, 4 * width, layers=2), Cluster.preset("dgx-a100", nodes=2)
    plan = autopar.plan(net, cluster, example_inputs=batch(rows, width))
    meshes, skipped = plan.stats["meshes"], plan.stats.get("meshes_skipped", [])
    assert skipped, "no mesh was skipped: the rule is not exercised"
    reached = {tuple(_axes(name).values()): m["predicted_step_s"] or m["lower_bound_s"]
               for name, m in meshes.items()}
    limit = plan.cost.total_s * (1 + THREE_AXIS_MARGIN)
    for name in skipped:
        a, b, c = _axes(name).values()
        assert all(reached[m] > limit for m in ((a * b, c), (a, b * c))), name
        alone = autopar.plan(net, cluster, example_inputs=batch(rows, width), mesh=_axes(name))
        assert alone.cost.total_s >= plan.cost.total_s * (1 - 1e-9), name


def test_planning_side_by_side_in_threads_changes_nothing(monkeypatch):
    """The meshes of a batch are planned in threads taking turns at Python while HiGHS
    solves: the plan, its cost and the stats (in their order) are those of one thread."""
    from autopar.search import meshes as planner
    net, cluster, x = meta_net(1024, 4096, layers=4), Cluster.preset("dgx-a100", nodes=2), \
        batch(4096, 1024)
    monkeypatch.setattr(planner.os, "cpu_count", lambda: 4)
    side_by_side = autopar.plan(net, cluster, example_inputs=x)
    monkeypatch.setattr(planner, "MAX_THREADS", 1)
    alone = autopar.plan(net, cluster, example_inputs=x)
    assert side_by_side.placements == alone.placements and side_by_side.cost == alone.cost
    assert list(side_by_side.stats["meshes"]) == list(alone.stats["meshes"])
    for name, m in alone.stats["meshes"].items():
        other = side_by_side.stats["meshes"][name]
        for key in ("predicted_step_s", "lower_bound_s", "folding"):
            assert other.get(key) == m.get(key), (name, key)


def test_a_fast_plan_that_misses_the_budget_names_the_exact_level():
    """Where the greedy level finds no plan within the budget but plans within it exist,
    the error says so and names level='full' (which finds one), rather than asking for more
    devices."""
    net, cluster, x = meta_net(2048, 8192, layers=10), Cluster.preset("dgx-a100", nodes=2), \
        batch(4096, 2048)
    free = autopar.plan(net, cluster, example_inputs=x, mesh={"dp": 16})
    budget = 0.9 * free.cost.memory_bytes_per_device
    exact = autopar.plan(net, cluster, example_inputs=x, mesh={"dp": 16},
                         memory_budget_bytes=budget, recompute="none", micro_batches=1)
    assert exact.cost.memory_bytes_per_device <= budget
    with pytest.raises(PlanError, match=r"level='fast' found no plan .* plan with "
                                        r"level='full'") as e:
        autopar.plan(net, cluster, example_inputs=x, mesh={"dp": 16}, level="fast",
                     memory_budget_bytes=budget, recompute="none", micro_batches=1)
    assert "Add devices" not in str(e.value)
