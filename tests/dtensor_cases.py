"""Cases run for real by tests/test_apply.py: one process per rank, gloo on CPU.

The plans are made once, in the test's own process, for 4 devices on mesh dp=2 x tp=2 with
Megatron pins; each rank reads them back from JSON, takes its model into
``autopar.apply`` (DTensor module styles on tp, FSDP2 on dp), feeds it its half of the batch
as a hand-written loop does, and trains three steps with ordinary torch optimizers, SGD then
AdamW. After each step the loss (averaged over dp), every gradient and every parameter
(``full_tensor()``) are compared with one device training the same model on the whole
batch; each case reports its worst relative error, or the error it raised.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "examples")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Shard  # noqa: E402

import autopar  # noqa: E402
from autopar.runtime.dtensor import local_inputs  # noqa: E402
from distributed_cases import _reported  # noqa: E402
from equivalence import ADAMW, GRAD_FLOOR, assert_close, loss_of, twin  # noqa: E402
from spawn import join_world  # noqa: E402

MESH = {"dp": 2, "tp": 2}
STEPS = ("sgd", "adamw", "adamw")
COLUMN, ROW, BATCH = "RS(0)", "RS(1)", "S(0)R"
PINS = {
    # the fused query, key and value projection split plainly: its output is gathered
    # before it is cut into three, and the attention runs whole; the tied embedding and
    # head split on the embedding dim (the head row-parallel)
    "gpt": {"h.*.attn.c_attn.*": COLUMN, "h.*.attn.c_proj.weight": ROW,
            "h.*.mlp.c_fc.*": COLUMN, "h.*.mlp.c_proj.weight": ROW, "wte.weight": ROW,
            "idx": BATCH, "targets": BATCH},
    # heads split: each rank views its projections with half the heads
    "llama": {"layers.*.attention.w[qkv].weight": COLUMN, "layers.*.attention.wo.weight": ROW,
              "layers.*.feed_forward.w[13].weight": COLUMN,
              "layers.*.feed_forward.w2.weight": ROW, "tokens": BATCH, "targets": BATCH},
    "hf-llama": {"*.self_attn.[qkv]_proj.weight": COLUMN, "*.self_attn.o_proj.weight": ROW,
                 "*.mlp.[gu][ap]*_proj.weight": COLUMN, "*.mlp.down_proj.weight": ROW,
                 "input_ids": BATCH, "labels": BATCH},
}
# (model, pins, storage): the last stores some parameters split over dp (FSDP), one
# column-parallel weight on its input features, so that one block and the root reshard
# after forward and the other block does not
CASES = {
    "gpt-megatron": ("gpt", "gpt", {}),
    "llama-megatron": ("llama", "llama", {}),
    "hf-llama-megatron": ("hf-llama", "hf-llama", {}),
    "llama-megatron-fsdp": ("llama", "llama", {"layers.1.*norm.weight": "S(0)R",
                                               "layers.1.feed_forward.w1.weight": "S(1)S(0)",
                                               "tok_embeddings.weight": "S(0)R"}),
}


def make_model(name):
    """(model, its keyword inputs): the zoo's GPT and LLaMA, or a transformers LLaMA."""
    if name == "hf-llama":
        import test_hf  # imports transformers: only where a case needs it
        return test_hf.make("llama")
    from test_e2e_simulated import make
    model, (tokens, targets), _ = make(name)
    first = "idx" if name == "gpt" else "tokens"
    return model, {first: tokens, "targets": targets}


def plan_case(case: str):
    """The plan of ``case`` for 4 devices on MESH."""
    name, pins, storage = CASES[case]
    model, inputs = make_model(name)
    return autopar.plan(model, autopar.Cluster.local(4, measure=False), example_inputs=inputs,
                        mesh=MESH, constraints=PINS[pins], storage=storage)


def make_plans() -> dict:
    """Case -> its plan's JSON."""
    return {case: plan_case(case).to_json() for case in CASES}


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_case(name, plan, own_mesh: bool) -> dict:
    """Three steps of the applied model against one device: the worst relative error, and
    whether apply warned of ops it runs whole where the plan splits them. ``own_mesh``:
    build the device mesh here, else let apply build it."""
    model, inputs = make_model(name)
    ref = twin(model)
    mesh = init_device_mesh("cpu", tuple(MESH.values()), mesh_dim_names=tuple(MESH)) \
        if own_mesh else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autopar.apply(model, plan, mesh)
    warned = any(str(w.message).startswith("autopar.apply:") for w in caught)
    stored = stored_as_planned(model, plan)
    mine = local_inputs(plan, inputs, mesh)
    optimizers = {"sgd": (torch.optim.SGD, dict(lr=0.1)), "adamw": (torch.optim.AdamW, ADAMW)}
    opts = {k: (cls(model.parameters(), **kw), cls(ref.parameters(), **kw))
            for k, (cls, kw) in optimizers.items()}
    worst = 0.0
    for i, kind in enumerate(STEPS):
        loss, want = loss_of(model(**mine)), loss_of(ref(**inputs))
        loss.backward()
        want.backward()
        mean = loss.detach().clone()   # the tp ranks of a dp rank hold the same loss
        dist.all_reduce(mean)
        worst = max(worst, assert_close(mean / dist.get_world_size(), want.detach(),
                                        f"step {i} loss"))
        floor = GRAD_FLOOR * max(p.grad.abs().max().item() for p in ref.parameters())
        for fqn, p in ref.named_parameters():
            got = full(model.get_parameter(fqn).grad)
            worst = max(worst, assert_close(got, p.grad, f"step {i} grad {fqn}", floor))
        for opt in opts[kind]:
            opt.step()
            opt.zero_grad()
        floor = GRAD_FLOOR * max(p.detach().abs().max().item() for p in ref.parameters())
        for fqn, p in ref.named_parameters():
            got = full(model.get_parameter(fqn).detach())
            worst = max(worst, assert_close(got, p, f"{kind} step {i}: parameter {fqn}",
                                            floor))
    return {"worst": worst, "warned": warned, "stored_as_planned": stored}


def stored_as_planned(model, plan) -> bool:
    """Whether FSDP holds each parameter the plan stores split over dp split on that dim."""
    d = list(plan.mesh).index("dp")
    for fqn, layout in plan.placements.items():
        if fqn in dict(model.named_buffers()) or not isinstance(layout[d], Shard):
            continue
        param = model.get_parameter(fqn)
        axis = param.device_mesh.mesh_dim_names.index("dp")
        if param.placements[axis].dim != layout[d].dim:
            return False
    return True


def main(plans, rank, world, port, result_dir):
    join_world(rank, world, port, result_dir, timeout_s=120)
    # full_tensor() of a parameter split over both axes gathers twice, and says so
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    results = {}
    for k, (case, text) in enumerate(plans.items()):
        results[case] = _reported(run_case, CASES[case][0], autopar.Plan.from_json(text),
                                  k % 2 == 0)
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
