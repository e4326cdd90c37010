"""A rank that fails never leaves the others hanging: real worlds of 2 gloo processes.

Every case kills or breaks its world, so the cases share two: the first runs, in order,
ranks planning differently, a rank failing while planning (neither runs a collective of a
program, so the group stays usable) and a rank failing in forward; the second a rank that
exits outright. The surviving rank must stop with an autopar error naming the failed rank
well within the group's timeout plus a margin, never gloo's bare error or a hang.
"""

from __future__ import annotations

import json
import os
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

import autopar
from autopar.runtime.faults import Difference, first_difference
from models import MLP
from spawn import free_port, join_world
from test_e2e_simulated import slow_devices

# spawns worlds of processes: runs after the rest, alone (README)
pytestmark = pytest.mark.processes

TIMEOUT_S = 15      # the process group's timeout in these worlds
SURVIVOR_S = 60     # what a surviving rank may take to stop, at most
WORLD_LIMIT_S = 150  # a world still running after this has hung: killed, the test fails
BATCH = (torch.randn(8, 16),)
DATA_PARALLEL = dict(mesh={"dp": 2}, constraints={"*": "R", "x": "S(0)"})
TENSOR_PARALLEL = dict(mesh={"tp": 2}, constraints={"fc1.weight": "S(0)"})


def _compile(cluster=None, **opts):
    torch.manual_seed(0)
    return autopar.compile(MLP(), cluster or autopar.Cluster.local(2, measure=False),
                           example_inputs=BATCH, **opts)


def _train_step(pm, opt):
    loss = pm(*BATCH).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def _outcome(case) -> dict:
    """What ``case(mark)`` raised on this rank, and how long after it last called
    ``mark()`` (its start, or where the failing part begins)."""
    marks = [time.perf_counter()]
    try:
        case(lambda: marks.append(time.perf_counter()))
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"error": type(e).__name__, "message": str(e),
                "failed_rank": getattr(e, "failed_rank", None),
                "elapsed_s": time.perf_counter() - marks[-1],
                "trace": traceback.format_exc()[-3000:]}
    return {"error": None, "elapsed_s": time.perf_counter() - marks[-1]}


def _fail_in_forward(rank, mark):
    """Rank 1 raises in the forward of the second step, after a first step on both ranks;
    data parallel, so rank 0's forward has no collective and it meets the failure at the
    gradient sum at the end of its backward."""
    pm = _compile(**DATA_PARALLEL)
    assert "summed over dp" in pm.code
    opt = torch.optim.SGD(pm.parameters(), lr=0.1)
    _train_step(pm, opt)

    def fail(module, args):
        raise RuntimeError(f"injected failure on rank {rank}")
    if rank == 1:
        pm.rank_program().register_forward_pre_hook(fail)
    mark()
    _train_step(pm, opt)


def _exit_mid_run(rank, mark):
    """Rank 1 exits with no word after a first step; rank 0's next forward all-gathers."""
    pm = _compile(**TENSOR_PARALLEL)
    assert "all_gather(" in pm.code
    opt = torch.optim.SGD(pm.parameters(), lr=0.1)
    _train_step(pm, opt)
    if rank == 1:
        os._exit(3)
    mark()
    _train_step(pm, opt)


def _world_with_errors(rank, world, port, out_dir):
    join_world(rank, world, port, out_dir, timeout_s=TIMEOUT_S)
    cluster = autopar.Cluster.local(2, measure=False) if rank == 0 else slow_devices(2)
    bad = {"fc1.weight": "S(7)"} if rank == 1 else {}  # fc1.weight has 2 dims
    results = {"different-clusters": _outcome(lambda mark: _compile(cluster)),
               "fails-while-planning": _outcome(lambda mark: _compile(mesh={"tp": 2},
                                                                      constraints=bad)),
               "fails-in-forward": _outcome(lambda mark: _fail_in_forward(rank, mark))}
    _finish(rank, out_dir, results, wait_for_rank_0=True)


def _world_with_an_exit(rank, world, port, out_dir):
    join_world(rank, world, port, out_dir, timeout_s=TIMEOUT_S)
    _finish(rank, out_dir, {"exits-mid-run": _outcome(lambda mark: _exit_mid_run(rank, mark))})


def _finish(rank, out_dir, results, wait_for_rank_0=False):
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    # rank 1 lives on until rank 0 is done: rank 0 must stop through its collective's
    # timeout, not because rank 1's connections closed
    done = os.path.join(out_dir, "rank0.json")
    deadline = time.monotonic() + SURVIVOR_S
    while wait_for_rank_0 and not os.path.exists(done) and time.monotonic() < deadline:
        time.sleep(0.1)
    os._exit(0)  # the group may be broken: no teardown that could wait on it


def _run(worker, tmp_path_factory, name) -> list:
    """Every rank's results (None for a rank that wrote none); the world is killed if it
    outlives WORLD_LIMIT_S."""
    out = tmp_path_factory.mktemp(name)
    ctx = mp.start_processes(worker, args=(2, free_port(), str(out)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + WORLD_LIMIT_S
    for p in ctx.processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    files = [out / f"rank{r}.json" for r in range(2)]
    return [json.loads(f.read_text()) if f.exists() else None for f in files]


@pytest.fixture(scope="module")
def errors_world(tmp_path_factory):
    results = _run(_world_with_errors, tmp_path_factory, "faults-errors")
    assert all(results), f"a rank hung or crashed: {results}"
    return results


@pytest.fixture(scope="module")
def exit_world(tmp_path_factory):
    return _run(_world_with_an_exit, tmp_path_factory, "faults-exit")


def test_first_difference_walks_the_plans_in_order():
    a = {"mesh": {"tp": 2}, "placements": {"w": "S(0)", "b": "R"}, "nodes": {"mm": [1, 2]}}
    b = {"mesh": {"tp": 2}, "placements": {"w": "S(0)", "b": "S(0)"}, "nodes": {"mm": [1, 3]}}
    assert first_difference(a, b) == Difference("placements['b']", "R", "S(0)")
    assert first_difference(a["nodes"], b["nodes"]) == Difference("mm[1]", 2, 3)
    assert first_difference({"mesh": {"tp": 2}}, {"mesh": {"dp": 2}}) == \
        Difference("mesh['tp']", 2, "(absent)")
    assert first_difference(a, a) is None


def test_ranks_planning_for_different_clusters_stop_at_the_plan_check(errors_world):
    for rank, res in enumerate(errors_world):
        r = res["different-clusters"]
        assert r["error"] == "PlanMismatch", f"rank {rank}: {r}"
        msg = r["message"]
        assert "different plans" in msg and "on rank 0" in msg and "on rank 1" in msg, msg
        assert "first difference: cluster is 'local x 2" in msg, msg
        # through the store, at the build: no collective, and no waiting for a timeout
        assert r["elapsed_s"] < TIMEOUT_S, r


def test_a_rank_failing_while_planning_is_named_by_the_other(errors_world):
    own = errors_world[1]["fails-while-planning"]
    assert own["error"] == "PlanError" and "S(7)" in own["message"], own
    r = errors_world[0]["fails-while-planning"]
    assert r["error"] == "RankFailed" and r["failed_rank"] == 1, r
    assert r["message"].startswith("rank 1 failed while planning: PlanError: constraint "
                                   "'fc1.weight'") and "S(7)" in r["message"], r["message"]
    assert r["elapsed_s"] < TIMEOUT_S, r  # seen at once, not after the timeout


def test_a_rank_failing_in_forward_is_named_by_the_other_within_the_timeout(errors_world):
    own = errors_world[1]["fails-in-forward"]
    assert own["error"] == "RuntimeError" and own["message"] == "injected failure on rank 1"
    r = errors_world[0]["fails-in-forward"]
    assert r["error"] == "RankFailed" and r["failed_rank"] == 1, r
    assert r["message"].startswith("rank 1 failed in forward: RuntimeError: injected "
                                   "failure on rank 1"), r["message"]
    # rank 1 lived on, so rank 0 waited out its gradient sum's timeout, and no longer
    assert TIMEOUT_S - 1 < r["elapsed_s"] < SURVIVOR_S, r


def test_a_rank_exiting_mid_run_is_named_by_the_other(exit_world):
    survivor, gone = exit_world
    assert survivor is not None, "rank 0 hung or crashed"
    assert gone is None  # rank 1 left with os._exit(3) before writing anything
    r = survivor["exits-mid-run"]
    assert r["error"] == "RankFailed" and r["failed_rank"] == 1, r
    assert r["message"].startswith("rank 1 stopped without recording an error"), r["message"]
    assert r["elapsed_s"] < SURVIVOR_S, r
    assert "rank 0's collective failed: RuntimeError: [" in r["message"], r  # gloo's words
