"""Checkpoints that move across plans (torch.distributed.checkpoint): saved under one plan,
loaded under another, training on equal to one device, optimizer states included; in
simulation for every case, and for real with 4 gloo processes saving and 2 loading."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

import checkpoint_cases as cc
from autopar import PlanError
from equivalence import RTOL
from spawn import run_world

pytestmark = pytest.mark.usefixtures("one_thread")

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


@pytest.fixture(autouse=True)
def _single_process_dcp():
    """dcp.save and dcp.load warn that they run in one process (no process group): meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@pytest.mark.parametrize("case", list(cc.CASES))
def test_a_checkpoint_saved_under_one_plan_trains_on_under_another(case, tmp_path):
    name, saving, loading = cc.CASES[case]
    worst, _ = cc.save_under(name, saving, 4, str(tmp_path), simulate=True)
    assert worst <= RTOL
    assert cc.load_under(name, loading, 2, str(tmp_path), simulate=True) <= RTOL


def test_a_plain_pytorch_checkpoint_loads_under_a_plan_and_back(tmp_path):
    """The one-device model's checkpoint, written with torch.distributed.checkpoint.state_dict's
    helpers, loads into a planned module; the planned module's loads into a fresh model."""
    ref, ref_opt, cfg = cc.reference("gpt")
    data = cc.batches(cfg)
    for batch in data[:cc.STEPS]:
        ref(*batch).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    msd, osd = get_state_dict(ref, ref_opt, options=FLAT)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "plain"))

    _, saving, _ = cc.CASES["gpt-dp2xtp2-sharded-to-tp2-recompute"]
    pm, opt = cc.compile_plan("gpt", saving, 4, simulate=True, seed=1)
    state = cc.state_of(pm, opt)
    dcp.load(state, checkpoint_id=str(tmp_path / "plain"))
    pm.load_state_dict(state["model"])
    pm.load_optimizer_state_dict(opt, state["optim"])
    assert cc.compare(pm, opt, ref, ref_opt) <= RTOL
    assert cc.train(pm, opt, ref, ref_opt, data[cc.STEPS:]) <= RTOL
    dcp.save(cc.state_of(pm, opt), checkpoint_id=str(tmp_path / "planned"))

    plain, _ = cc.make_model("gpt", seed=1)
    plain_opt = torch.optim.AdamW(plain.parameters(), **cc.ADAMW)
    msd, osd = get_state_dict(plain, plain_opt, options=FLAT)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "planned"))
    set_state_dict(plain, plain_opt, model_state_dict=msd, optim_state_dict=osd, options=FLAT)
    params = dict(ref.named_parameters())
    for fqn, p in plain.named_parameters():
        torch.testing.assert_close(p, params[fqn], rtol=RTOL, atol=1e-7)
        for key, value in plain_opt.state[p].items():
            torch.testing.assert_close(value, ref_opt.state[params[fqn]][key], rtol=RTOL,
                                       atol=1e-9)


def test_loading_a_state_of_another_model_names_what_is_wrong(tmp_path):
    pm, opt = cc.compile_plan("gpt", dict(mesh={"tp": 2}), 2, simulate=True, seed=0)
    state = pm.state_dict()
    with pytest.raises(PlanError, match="lacks .*wte.weight"):
        pm.load_state_dict({k: v for k, v in state.items() if k != "wte.weight"})
    state["wte.weight"] = torch.zeros(3, 3)
    with pytest.raises(PlanError, match=r"wte.weight: .*\(3, 3\).* shape"):
        pm.load_state_dict(state)
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(PlanError, match="pm.parameters()"):
        pm.optimizer_state_dict(other)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """4 processes train and save each case; then 2 processes load and train on."""
    return (run_world(cc.save_world, 4, tmp_path_factory, "save4"),
            run_world(cc.load_world, 2, tmp_path_factory, "load2"))


@pytest.mark.processes
def test_4_processes_save_and_2_load_under_another_plan(worlds):
    for when, results in zip(("saved on 4", "loaded on 2"), worlds):
        for rank, res in enumerate(results):
            for case in cc.CASES:
                r = res[case]
                assert "error" not in r, f"{when}, rank {rank}, {case}: {r['error']}"
                assert r["worst"] <= RTOL, f"{when}, rank {rank}, {case}: {r['worst']}"
                # each rank hands DCP its own shards (views of them), never gathered copies
                assert when != "saved on 4" or r["own shards"] > 0, case
