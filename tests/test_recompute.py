"""Activation recomputation in the rank program: every block the plan recomputes runs under
torch.utils.checkpoint ("full": everything again in backward; "selective": matmul-like ops and
collectives kept), and the program still equals one device in outputs, every gradient and
the parameters after SGD and AdamW steps; recomputing holds fewer bytes for backward; a
recomputed dropout draws its forward's mask again."""

from __future__ import annotations

import gc
import math
import re
import types
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy

import autopar
from autopar import Replicate
from autopar.rules.traits import KEPT_BY_SELECTIVE
from autopar.runtime import checkpoint as ckpt
from autopar.passes.generate_rank_program import recompute_choices
from equivalence import check_training, twin
from models import GPT, GPTConfig, tiny_batch
from test_e2e_simulated import MESHES, make, slow_devices

CALL = re.compile(r"^    (\w+) = autopar_runtime_checkpoint_(\w+)\(", re.M)
COLLECTIVE = re.compile(r"autopar_runtime_collectives_(all_reduce|all_gather|reduce_scatter|"
                        r"all_to_all|grad_sum|shard|gather_shards)\(")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny ops, one thread


def compile_sim(model, example, mesh, **options):
    n = math.prod(mesh.values())
    options.setdefault("cluster", slow_devices(n))   # split work pays: collectives in blocks
    return autopar.compile(model, options.pop("cluster"), example_inputs=example, mesh=mesh,
                           simulate=True, **options)


def main_code(pm) -> str:
    """The rank program's own function, without the blocks' code that follows it."""
    return pm.code.split("\n\n# ", 1)[0]


def block_code(pm) -> str:
    return pm.code.split("\n\n# ", 1)[1] if "\n\n# " in pm.code else ""


def checkpoint_calls(pm) -> list:
    """Block names the main program calls through autopar.runtime.checkpoint, in order."""
    return [name for _, name in CALL.findall(main_code(pm))]


def recomputed(plan) -> dict:
    return {p: c for p, c in plan.recompute.items() if c != "none"}


# -- the zoo, each choice, each mesh -------------------------------------------------------------

CASES = [("gpt", "selective", "2"), ("gpt", "full", "2x2"), ("llama", "full", "4"),
         ("llama", "selective", "2x2"), ("bert", "selective", "4"), ("bert", "full", "2")]


@pytest.mark.parametrize("name,choice,mesh", CASES)
def test_zoo_model_recomputed_matches_one_device(name, choice, mesh):
    model, args, kwargs = make(name)
    ref = twin(model)
    pm = compile_sim(model, kwargs or args, MESHES[mesh], recompute=choice)
    blocks = recomputed(pm.plan)
    assert len(blocks) >= 2 and set(blocks.values()) == {choice}
    assert checkpoint_calls(pm) == [ckpt.identifier(p) for p in blocks]
    assert COLLECTIVE.search(block_code(pm)), "no collective inside a recomputed block"
    check_training(pm, ref, args, kwargs)


def test_transformers_llama_recomputed_in_full_matches_one_device():
    import test_hf
    model, inputs = test_hf.make("llama")
    ref = twin(model)
    pm = compile_sim(model, inputs, {"tp": 2}, recompute="full")
    instances = sum(pm.plan.stats["block_classes"]["instances"])
    assert instances == 2 and set(pm.plan.recompute.values()) == {"full"}
    assert len(checkpoint_calls(pm)) == instances
    check_training(pm, ref, (), inputs, steps=test_hf.STEPS)


def test_mixed_choices_call_a_checkpoint_for_exactly_the_recomputed_blocks():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3))
    ref, batch = twin(model), tiny_batch(model.cfg)
    pm = compile_sim(model, batch, MESHES["2x2"], recompute={"h.0": "full", "h.1": "selective"})
    assert pm.plan.recompute == {"h.0": "full", "h.1": "selective", "h.2": "none"}
    assert checkpoint_calls(pm) == ["h_0", "h_1"]
    assert "# h.0: full recomputation in backward" in main_code(pm)
    assert "# h.1: selective recomputation in backward" in main_code(pm)
    shown = re.findall(r"^# (\S+), recomputed in backward \((\w+)\)", pm.code, re.M)
    assert shown == [("h.0", "full"), ("h.1", "selective")]
    assert "h_2_attn_c_attn_weight" in main_code(pm)   # h.2 runs inline
    check_training(pm, ref, batch)


def test_no_checkpoint_call_without_recomputation():
    model, args, _ = make("gpt")
    pm = compile_sim(model, args, {"tp": 2}, cluster=autopar.Cluster.local(2),
                     recompute="none")
    assert checkpoint_calls(pm) == [] and "recomputed in backward" not in pm.code


# -- what stays saved for backward ---------------------------------------------------------------

class _Created(TorchDispatchMode):
    """Weak references to every tensor the ops create."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _bytes(tensors, skip=frozenset()) -> int:
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def saved_bytes(pm, inputs) -> tuple:
    """Bytes held for backward after a forward of the rank program, over distinct storages:
    (what autograd saved as seen by ``saved_tensors_hooks``, what the ops created and is
    still alive). Checkpoint installs its own hooks inside a block and a selective block
    keeps its outputs in its own cache, so the first sees a recomputed block's arguments
    only; the second sees everything kept."""
    fixed = {t.untyped_storage().data_ptr() for t in [*pm.parameters(), *inputs]}
    packed = []

    def pack(t):
        packed.append(t)
        return t

    created = _Created()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), created:
        loss = pm(*inputs)
    gc.collect()
    alive = [r() for r in created.refs]
    held = _bytes([t for t in alive if t is not None and t is not loss], fixed)
    hooked = _bytes(packed, fixed)
    del alive, packed
    loss.backward()
    return hooked, held


def test_recomputation_holds_fewer_bytes_full_fewer_than_selective_fewer_than_none():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_embd=64))
    batch = tiny_batch(model.cfg, batch=8, seq=16)
    measured = {}
    for choice in ("none", "selective", "full"):
        # every parameter used whole: the same layouts whatever the choice, so that only
        # what recomputation keeps differs (free to choose, equal-time plans differ in memory)
        pm = compile_sim(twin(model), batch, {"tp": 2}, recompute=choice,
                         constraints={"*.*": "R"})
        assert len(checkpoint_calls(pm)) == (0 if choice == "none" else 4)
        measured[choice] = saved_bytes(pm, batch)
    hooked = {c: m[0] for c, m in measured.items()}
    held = {c: m[1] for c, m in measured.items()}
    assert held["full"] < held["selective"] < held["none"], held
    assert hooked["full"] <= hooked["selective"] < hooked["none"], hooked
    # selective keeps at least the matmul outputs, full only the blocks' inputs
    assert held["selective"] - held["full"] > 0.2 * (held["none"] - held["full"]), held


class _Collectives(TorchDispatchMode):
    """Counts the collectives that run."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += ckpt.communicates(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("choice,again", [("selective", False), ("full", True)])
def test_selective_runs_no_collective_again_in_backward(choice, again):
    model, args, _ = make("gpt")
    pm = compile_sim(model, args, {"tp": 2}, recompute=choice)
    assert COLLECTIVE.search(block_code(pm))
    loss = pm(*args)
    counter = _Collectives()
    with counter:
        loss.backward()
    assert (counter.count > 0) == again, counter.count   # backward's own are not ops


# -- randomness ----------------------------------------------------------------------------------

def _seeded(module, seed=7):
    """Every call of ``module`` draws from the same generator state."""
    def reseed(mod, args):
        torch.manual_seed(seed)

    module.register_forward_pre_hook(reseed)
    return module


@pytest.mark.parametrize("choice", ["full", "selective"])
def test_recomputed_dropout_draws_its_forward_masks_and_matches_one_device(choice):
    """Dropout in attention and after the MLP of every block, replicated everywhere (so one
    device's masks are every rank's): a recomputation drawing other masks in backward would
    give other gradients."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(dropout=0.2))
    batch = tiny_batch(model.cfg)
    ref = _seeded(twin(model))
    pm = _seeded(compile_sim(model, batch, {"tp": 2}, cluster=autopar.Cluster.local(2),
                             constraints={"*": "R"}, recompute=choice))
    drawn = [n for n in pm.plan.nodes.values()
             if n["op"] in ("dropout", "scaled_dot_product_attention")]
    assert len(drawn) == 4
    assert all(isinstance(p, Replicate) for n in drawn for p in n["output"]), drawn
    assert len(checkpoint_calls(pm)) == 2
    with torch.no_grad():   # dropout is on: another seed gives another loss
        torch.manual_seed(8)
        assert not torch.equal(pm(*batch), model(*batch))
    check_training(pm, ref, batch)


# -- the policy and bad input --------------------------------------------------------------------

def test_every_kept_op_reaches_the_policy_as_an_aten_op():
    for name in KEPT_BY_SELECTIVE:
        assert ckpt.kept_aten_ops({name}), f"{name}: no aten op to keep"
    aten = torch.ops.aten
    q = torch.randn(1, 1, 2, 4)
    policy = ckpt.selective_policy
    assert policy(None, aten.mm.default) is CheckpointPolicy.MUST_SAVE
    assert policy(None, aten.addmm.default) is CheckpointPolicy.MUST_SAVE
    assert policy(None, torch.ops._c10d_functional.all_reduce.default) is CheckpointPolicy.MUST_SAVE
    assert policy(None, aten.add.Tensor) is CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(None, aten.bernoulli_.float) is CheckpointPolicy.MUST_RECOMPUTE
    flash = aten._scaled_dot_product_flash_attention_for_cpu.default
    assert policy(None, flash, q, q, q, 0.0) is CheckpointPolicy.MUST_SAVE
    # attention that draws is recomputed, so every later draw gets its forward's numbers
    assert policy(None, flash, q, q, q, 0.1) is CheckpointPolicy.MUST_RECOMPUTE
    simulated = torch.ops.autopar.simulated_collective.default
    assert policy(None, simulated) is CheckpointPolicy.MUST_SAVE


def test_bad_choices_are_clear_errors():
    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    with pytest.raises(ValueError, match=r"block 'h.0': recompute choice 'none'.*selective"):
        ckpt.Recomputed("h.0", "none", gm)
    with pytest.raises(ValueError, match=r"'partial'.*'selective' or 'full'"):
        ckpt.run_checkpointed(gm, "partial", torch.ones(1))
    inst = types.SimpleNamespace(path="h.0")
    ctx = types.SimpleNamespace(plan=types.SimpleNamespace(recompute={"h.7": "full"}),
                                blocks=[types.SimpleNamespace(instances=[inst])])
    with pytest.raises(autopar.PlanError, match=r"\['h.7'\].*its blocks: \['h.0'\]"):
        recompute_choices(ctx)
    ctx.plan.recompute = {"h.0": "most"}
    with pytest.raises(autopar.PlanError, match=r"'h.0'\] = 'most'.*none, selective, full"):
        recompute_choices(ctx)
