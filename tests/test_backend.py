"""torch.compile and autopar: ``autopar.backend`` as a torch.compile backend (the user's module
and optimizer unchanged, every rank's gradients equal to one device's), and the ParallelModule
``autopar.compile`` returns wrapped in ``torch.compile`` (inductor on CPU) giving the same
losses, gradients and parameters as without. Simulated in this process, and for real with 2
gloo processes spawned once for every case."""

from __future__ import annotations

import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

import autopar
from autopar import Cluster, PlanError
from equivalence import RTOL, Whole, check_training, twin
from models import MLP
from spawn import join_world, run_world
from test_e2e_simulated import SHARDED_INPUTS, make, megatron, slow_devices

STEPS = ("sgd", "adamw")


def check_compiled_training(compiled, model, ref, args, kwargs=None, steps=STEPS) -> float:
    """``compiled`` is ``torch.compile(model, ...)``: after each step of ``steps`` its outputs,
    ``model``'s gradients and then its parameters match the single-device ``ref``."""
    return check_training(Whole(compiled, model), ref, args, kwargs, steps=steps)


# Each case: model name, backend options, a line the rank program must hold. Megatron pins
# column- and row-parallel weights: each enters whole and is sliced, its gradient gathered
# back. The default plan on a dp mesh with the batch split sums replicated parameters'
# gradients over dp. "sharded" pins weights split over dp: sliced on entry, gathered for use.
BACKEND_CASES = {
    "mlp-megatron": ("mlp", dict(cluster=Cluster.local(2, measure=False), mesh={"tp": 2},
                                 constraints=megatron("mlp", {"tp": 2})),
                     "shard(fc2_weight, 1, 'tp')"),
    "gpt-default": ("gpt", dict(cluster=slow_devices(2), mesh={"dp": 2},
                                constraints=SHARDED_INPUTS["gpt"]),
                    "grad_sum("),
    "gpt-sharded": ("gpt", dict(cluster=slow_devices(2), mesh={"dp": 2},
                                constraints={"*weight": "R", **SHARDED_INPUTS["gpt"]},
                                storage={"*weight": "S(0)"}),
                    "shard(h_0_mlp_c_fc_weight, 0, 'dp')"),
}


def run_backend_case(case, simulate):
    name, opts, _ = BACKEND_CASES[case]
    opts = dict(opts)
    model, args, kwargs = make(name)
    ref = twin(model)
    be = autopar.backend(opts.pop("cluster"), simulate=simulate, **opts)
    worst = check_compiled_training(torch.compile(model, backend=be), model, ref, args, kwargs)
    return worst, be


# -- simulated: every rank in this process -----------------------------------------------------

@pytest.mark.parametrize("case", list(BACKEND_CASES))
def test_backend_trains_like_one_device_simulated(case):
    worst, be = run_backend_case(case, simulate=True)
    assert worst <= RTOL
    [graph] = be.graphs
    _, opts, expect = BACKEND_CASES[case]
    assert graph.plan.mesh == opts["mesh"]
    assert expect in graph.code


def test_parameters_enter_whole_and_are_sliced_in_the_program():
    _, be = run_backend_case("mlp-megatron", simulate=True)
    code = be.graphs[0].code
    # the module's full weight is a graph input; the rank program takes its slice
    assert "def forward(self, fc1_weight, fc1_bias, x, fc2_weight, fc2_bias)" in code
    assert "shard(fc1_weight, 0, 'tp')" in code and "shard(fc2_weight, 1, 'tp')" in code
    compile(code, "<rank program>", "exec")


def test_unconstrained_parameters_are_planned_replicated():
    # autopar.plan stores GPT's weights sharded on this cluster; the module under torch.compile
    # holds them whole, and the backend plans them so
    model, args, _ = make("gpt")
    be = autopar.backend(slow_devices(4), simulate=True, constraints=SHARDED_INPUTS["gpt"])
    ref = twin(model)
    torch.testing.assert_close(torch.compile(model, backend=be)(*args), ref(*args),
                               rtol=RTOL, atol=0)
    plan = be.graphs[0].plan
    assert len(plan.mesh) == 1  # the input constraints have one placement: 1-axis meshes only
    assert set(plan.placements.values()) == {(autopar.Replicate(),)}


def test_registered_by_name_runs_on_one_device_without_a_process_group():
    assert "autopar" in torch._dynamo.list_backends(exclude_tags=())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))  # FQNs "0.weight"
    ref = twin(model)
    check_compiled_training(torch.compile(model, backend="autopar"), model, ref,
                            (torch.randn(8, 16),))


class TwoGraphs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:   # data-dependent Python: Dynamo breaks the graph here
            h = h * 2
        return self.b(h)


def test_graph_break_plans_each_graph_separately():
    torch.manual_seed(0)
    model = TwoGraphs()
    ref = twin(model)
    be = autopar.backend(slow_devices(2), simulate=True)
    check_compiled_training(torch.compile(model, backend=be), model, ref, (torch.randn(8, 16),))
    assert [set(g.plan.placements) for g in be.graphs] == [{"a.weight", "a.bias"},
                                                           {"b.weight", "b.bias"}]


def test_new_input_shape_plans_again():
    torch.manual_seed(0)
    model = MLP()
    ref = twin(model)
    be = autopar.backend(slow_devices(2), simulate=True)
    compiled = torch.compile(model, backend=be)
    for rows in (8, 4, 6):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(compiled(x), ref(x), rtol=RTOL, atol=1e-6)
    # Dynamo compiles a static graph, then one with a symbolic batch size: planned per size
    assert sorted(len(g.plans) for g in be.graphs) == [1, 2]


# -- bad input ---------------------------------------------------------------------------------

def test_several_devices_without_process_group_is_a_clear_error():
    be = autopar.backend(Cluster.local(2, measure=False))
    with pytest.raises(PlanError, match="torch.distributed is not initialized.*simulate=True"):
        torch.compile(MLP(), backend=be)(torch.randn(8, 16))


def test_bad_backend_options_are_clear_errors():
    with pytest.raises(PlanError, match="cluster must be an autopar.Cluster"):
        autopar.backend("dgx-a100")
    with pytest.raises(PlanError, match="level='best'"):
        autopar.backend(Cluster.local(2, measure=False), level="best")
    be = autopar.backend(Cluster.local(2, measure=False), simulate=True,
                         constraints={"fc3.weight": "S(0)"})
    with pytest.raises(PlanError, match=r"'fc3\.weight' matches no parameter.*'fc1\.weight'"):
        torch.compile(MLP(), backend=be)(torch.randn(8, 16))


def test_plan_before_first_call_is_a_clear_error():
    be = autopar.backend(Cluster.local(2, measure=False), simulate=True)
    graph = be(torch.fx.symbolic_trace(MLP()), [torch.randn(8, 16)])
    with pytest.raises(PlanError, match="call the compiled model once"):
        graph.plan


# -- ParallelModule under torch.compile (inductor) ---------------------------------------------

COMPILED_PM_CASES = {
    "mlp-megatron": ("mlp", dict(cluster=Cluster.local(2, measure=False), mesh={"tp": 2},
                                 constraints=megatron("mlp", {"tp": 2}))),
    "mlp-dataparallel": ("mlp", dict(cluster=slow_devices(2), mesh={"dp": 2},
                                     constraints={"*": "R", **SHARDED_INPUTS["mlp"]})),
}


def run_compiled_pm_case(case, simulate):
    """Train the ParallelModule under torch.compile (inductor) side by side with one device.
    Returns (worst relative error, graphs Dynamo compiled, graph breaks)."""
    name, opts = COMPILED_PM_CASES[case]
    opts = dict(opts)
    model, args, kwargs = make(name)
    ref = twin(model)
    pm = autopar.compile(model, opts.pop("cluster"), example_inputs=args, simulate=simulate,
                         **opts)
    torch._dynamo.reset()
    counters.clear()
    worst = check_training(torch.compile(pm), ref, args, kwargs, steps=STEPS)
    return worst, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@pytest.mark.parametrize("case", list(COMPILED_PM_CASES))
def test_parallel_module_under_inductor_matches_one_device_simulated(case):
    # the per-rank interpreter of simulated mode runs eagerly inside the compiled module
    worst, _, _ = run_compiled_pm_case(case, simulate=True)
    assert worst <= RTOL


# -- two real processes (gloo), spawned once -----------------------------------------------------

def _capture(fn):
    start = time.perf_counter()
    try:
        out = {"value": fn()}
    except Exception as e:  # noqa: BLE001 - reported to the test
        out = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    return out | {"seconds": time.perf_counter() - start}


def _by_name_case():
    model, args, _ = make("gpt")
    ref = twin(model)
    return check_compiled_training(torch.compile(model, backend="autopar"), model, ref, args)


def _world_mismatch_case():
    torch.compile(MLP(), backend=autopar.backend(Cluster.local(4, measure=False)))(
        torch.randn(8, 16))


def _plan_mismatch_case():
    # rank 0 pins a layout the other rank does not: ranks must stop, not hang or diverge
    opts = dict(constraints={"fc1.weight": "S(0)"}) if dist.get_rank() == 0 else {}
    be = autopar.backend(Cluster.local(2, measure=False), mesh={"tp": 2}, **opts)
    torch.compile(MLP(), backend=be)(torch.randn(8, 16))


def _worker(rank, world, port, out_dir):
    join_world(rank, world, port, out_dir, timeout_s=60)
    inductor_config.compile_threads = 1  # no pool of compile workers on a 2-core machine
    results = {}
    for case in BACKEND_CASES:
        results[f"backend-{case}"] = _capture(lambda: run_backend_case(case, False)[0])
    results["backend-by-name"] = _capture(_by_name_case)
    # one inductor compile (fwd and bwd) costs 10-20 s here: the data-parallel case, whose
    # sharded input once broke the graph and whose gradient sums run after compiled backward
    results["compiled-pm"] = _capture(lambda: run_compiled_pm_case("mlp-dataparallel", False))
    results["world-mismatch"] = _capture(_world_mismatch_case)
    results["plan-mismatch"] = _capture(_plan_mismatch_case)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return run_world(_worker, 2, tmp_path_factory, "backend-world2")


@pytest.mark.processes
def test_two_processes_train_like_one_device(two_processes):
    cases = [f"backend-{c}" for c in BACKEND_CASES] + ["backend-by-name"]
    for rank, results in enumerate(two_processes):
        for case in cases:
            r = results[case]
            assert "error" not in r, f"rank {rank} {case}: {r.get('error')}\n{r.get('trace')}"
            assert r["value"] <= RTOL, f"rank {rank} {case}: worst relative error {r['value']}"


@pytest.mark.processes
def test_two_processes_parallel_module_compiles_whole_under_inductor(two_processes):
    # the rank program, collectives included, is one graph for inductor: no graph break
    for rank, results in enumerate(two_processes):
        r = results["compiled-pm"]
        assert "error" not in r, f"rank {rank}: {r.get('error')}\n{r.get('trace')}"
        worst, graphs, breaks = r["value"]
        assert worst <= RTOL, f"rank {rank}: worst relative error {worst}"
        assert graphs >= 1 and breaks == 0, f"rank {rank}: {graphs} graphs, {breaks} breaks"


@pytest.mark.processes
def test_two_processes_misuse_is_a_clear_error(two_processes):
    for results in two_processes:
        msg = results["world-mismatch"].get("error", "no error")
        assert msg.startswith("PlanError") and "world size 2" in msg \
            and "4 devices" in msg, msg
        msg = results["plan-mismatch"].get("error", "no error")
        assert msg.startswith("PlanMismatch") and "different plans" in msg, msg
