"""Checkpoints across plans: train under one plan, save with torch.distributed.checkpoint,
load under another plan (another mesh, world size, stages, micro-batches, recomputation),
train on; every step equal to one device training throughout, optimizer states included.

Shared by tests/test_checkpoint.py's simulated cases and its real worlds (4 gloo processes
save, 2 load)."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "examples")]

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

import autopar  # noqa: E402
from equivalence import GRAD_FLOOR, assert_close, twin  # noqa: E402
from test_e2e_simulated import SHARDED_INPUTS, megatron, slow_devices  # noqa: E402

from equivalence import ADAMW  # noqa: E402
STEPS = 3   # before the save, and after the load


def make_model(name: str, seed: int = 0):
    from models import GPT, GPTConfig, Llama, LlamaConfig
    torch.manual_seed(seed)
    if name == "gpt":
        cfg = GPTConfig(n_layer=2)
        return GPT(cfg), cfg
    cfg = LlamaConfig(n_layers=2)
    return Llama(cfg), cfg


def batches(cfg, count: int = 2 * STEPS) -> list:
    """A different batch for each step (of 8 rows, so that 4 ranks and 2 micro-batches split
    it)."""
    from models import tiny_batch
    return [tiny_batch(cfg, batch=8, seed=100 + i) for i in range(count)]


# name -> (model, the plan that saves (on 4 ranks), the plan that loads (on 2 ranks))
CASES = {
    "gpt-dp2xtp2-sharded-to-tp2-recompute": ("gpt", dict(
        mesh={"dp": 2, "tp": 2}, constraints={**megatron("gpt", {"dp": 2, "tp": 2}),
                                              **{k: v + "R" for k, v in
                                                 SHARDED_INPUTS["gpt"].items()}},
        storage={"h.*.mlp.*.weight": "S(0)S(0)"}),
        dict(mesh={"tp": 2}, constraints=megatron("gpt", {"tp": 2}), recompute="full")),
    "llama-tp4-to-pp2-microbatches": ("llama", dict(
        mesh={"tp": 4}, constraints=megatron("llama", {"tp": 4})),
        dict(mesh={"pp": 2}, stages=(1, 1), schedule="1f1b", micro_batches=2)),
    "gpt-pp2xdp2-to-dp2-microbatches": ("gpt", dict(
        mesh={"pp": 2, "dp": 2}, stages=(1, 1), schedule="gpipe", micro_batches=2),
        dict(mesh={"dp": 2}, micro_batches=2,
             constraints={"*": "R", **SHARDED_INPUTS["gpt"]})),
}


def compile_plan(name: str, opts: dict, world: int, simulate: bool, seed: int):
    """The parallel module of case model ``name`` (initialized from ``seed``) under ``opts``."""
    model, cfg = make_model(name, seed)
    example = batches(cfg, 1)[0]
    pm = autopar.compile(model, slow_devices(world), example_inputs=example,
                         simulate=simulate, **opts)
    return pm, torch.optim.AdamW(pm.parameters(), **ADAMW)


def reference(name: str):
    """The one-device model and its optimizer, from the initialization the saving plan
    starts from."""
    model, cfg = make_model(name, seed=0)
    model = twin(model)
    return model, torch.optim.AdamW(model.parameters(), **ADAMW), cfg


def train(pm, opt, ref, ref_opt, steps: list) -> float:
    """One AdamW step of each on each batch; the worst relative error of the losses."""
    worst = 0.0
    for i, batch in enumerate(steps):
        loss = pm.step(*batch)
        want = ref(*batch)
        want.backward()
        worst = max(worst, assert_close(loss, want.detach(), f"step {i} loss"))
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    return worst


def compare(pm, opt, ref, ref_opt) -> float:
    """Every parameter and every AdamW state of ``pm`` against the one device's."""
    worst = 0.0
    state = pm.full_state_dict()
    floor = GRAD_FLOOR * max(p.detach().abs().max().item() for p in ref.parameters())
    for fqn, p in ref.named_parameters():
        worst = max(worst, assert_close(state[fqn], p, f"parameter {fqn}", floor))
    mine = pm.optimizer_state_dict(opt)
    held = {k[len("param_groups."):-len(".lr")] for k in mine   # this rank's stages'
            if k.startswith("param_groups.") and k.endswith(".lr")}
    assert held, "no optimizer state held here"
    for fqn, p in ref.named_parameters():
        if fqn not in held:
            continue
        for key, want in ref_opt.state[p].items():
            got = mine[f"state.{fqn}.{key}"]
            if hasattr(got, "full_tensor"):
                got = got.full_tensor()
            scale = GRAD_FLOOR * want.abs().max().item() if want.dim() else 0.0
            worst = max(worst, assert_close(torch.as_tensor(got).to(want.dtype), want,
                                            f"optimizer {key} of {fqn}", scale))
        assert mine[f"param_groups.{fqn}.lr"] == ref_opt.param_groups[0]["lr"]
    return worst


def state_of(pm, opt) -> dict:
    return {"model": pm.state_dict(), "optim": pm.optimizer_state_dict(opt)}


def save_under(name: str, opts: dict, world: int, path: str, simulate: bool) -> float:
    """Train ``STEPS`` steps under the saving plan (checked against one device), then save."""
    ref, ref_opt, cfg = reference(name)
    pm, opt = compile_plan(name, opts, world, simulate, seed=0)
    worst = train(pm, opt, ref, ref_opt, batches(cfg)[:STEPS])
    worst = max(worst, compare(pm, opt, ref, ref_opt))
    dcp.save(state_of(pm, opt), checkpoint_id=path)
    return worst, 0 if simulate else held_as_own_shards(pm)


def held_as_own_shards(pm) -> int:
    """In distributed mode, check that the checkpoint entry of every parameter whose layout
    DTensor shares is this rank's own shard, not a gathered copy (a view of the very
    tensor); the number of such entries."""
    from autopar.program.placement import is_strided
    from autopar.runtime.state import model_state
    count = 0
    for stage in getattr(pm, "stages", None) or [pm]:
        state = model_state(stage)
        for name, (fqn, layout) in stage._program.attrs.items():
            if any(is_strided(p) for p in layout):
                continue
            shard, local = getattr(stage.program, name), state[fqn].to_local()
            assert local.data_ptr() == shard.data_ptr() and local.shape == shard.shape, fqn
            count += 1
    return count


def load_under(name: str, opts: dict, world: int, path: str, simulate: bool) -> float:
    """A module of another initialization under the loading plan, with its optimizer at
    another learning rate: the checkpoint restores both; then ``STEPS`` more steps, equal to
    one device's steps after its first ``STEPS``."""
    ref, ref_opt, cfg = reference(name)
    data = batches(cfg)
    for batch in data[:STEPS]:
        ref(*batch).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    pm, opt = compile_plan(name, opts, world, simulate, seed=1)
    for group in opt.param_groups:
        group["lr"] = 0.5
    state = state_of(pm, opt)
    dcp.load(state, checkpoint_id=path)
    pm.load_state_dict(state["model"])
    pm.load_optimizer_state_dict(opt, state["optim"])
    worst = compare(pm, opt, ref, ref_opt)
    worst = max(worst, train(pm, opt, ref, ref_opt, data[STEPS:]))
    return max(worst, compare(pm, opt, ref, ref_opt))


def _folder(result_dir: str, case: str) -> str:
    """Where both worlds find a case's checkpoint: beside their result folders."""
    return os.path.join(os.path.dirname(result_dir), "autopar-checkpoints", case)


def _world(rank, world, port, result_dir, save: bool):
    import json
    import traceback
    import warnings

    import torch.distributed as dist
    from spawn import join_world
    warnings.filterwarnings("ignore")
    join_world(rank, world, port, result_dir, timeout_s=120)
    results = {}
    for case, (name, saving, loading) in CASES.items():
        try:
            if save:
                worst, own = save_under(name, saving, world, _folder(result_dir, case), False)
                results[case] = {"worst": worst, "own shards": own}
            else:
                worst = load_under(name, loading, world, _folder(result_dir, case), False)
                results[case] = {"worst": worst}
        except Exception as e:  # reported per case; the ranks stay in step for the next
            results[case] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        dist.barrier()
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def save_world(rank, world, port, result_dir):
    """In each of 4 processes: every case's saving plan trained, then saved."""
    _world(rank, world, port, result_dir, save=True)


def load_world(rank, world, port, result_dir):
    """In each of 2 processes: every case's loading plan loaded, then trained on."""
    _world(rank, world, port, result_dir, save=False)
