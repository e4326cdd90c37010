"""Micro-batches: ``pm.step`` over m micro-batches equals the full batch on one device (loss
with unevenly ignored tokens, every gradient, parameters after AdamW steps), gradients are
all-reduced once per bucket per step, a regularizer counts once, and steps that do not split
are refused with clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autopar
from autopar import PlanError
from autopar.passes.split_micro_batches import FIRST_FLAG
from equivalence import assert_close, check_steps, count_launches, twin, uneven_targets
from models import GPT, GPTConfig, Llama, LlamaConfig, tiny_batch
from test_e2e_simulated import megatron, slow_devices

BATCH = 8
STEPS = 3

# (model, m, mesh): data parallel on the micro-batch where the mesh has a dp axis
CASES = [("gpt", 2, {"dp": 2}), ("gpt", 4, {"dp": 2, "tp": 2}),
         ("llama", 2, {"dp": 2, "tp": 2}), ("llama", 4, {"tp": 4})]


def make(name, seed=0):
    torch.manual_seed(seed)
    if name == "gpt":
        cfg = GPTConfig()
        return GPT(cfg), cfg
    cfg = LlamaConfig()
    return Llama(cfg), cfg


def batches(cfg, m, count=STEPS):
    out = []
    for s in range(count):
        tokens, targets = tiny_batch(cfg, batch=BATCH, seed=s)
        out.append((tokens, uneven_targets(targets, m)))
    return out


def constraints(name, mesh):
    """Inputs split over dp (as a data-parallel run holds them), Megatron on tp."""
    out = megatron(name, mesh) if "tp" in mesh else {"*": "R"}
    split = "S(0)" + "R" * (len(mesh) - 1) if "dp" in mesh else None
    inputs = ("idx", "targets") if name == "gpt" else ("tokens", "targets")
    return out | ({i: split for i in inputs} if split else {})


def compile_(model, example, m, mesh=None, name=None, **opts):
    n = 1
    for v in (mesh or {"dp": 2}).values():
        n *= v
    cons = constraints(name, mesh) if name else None
    return autopar.compile(model, slow_devices(n), example_inputs=example, simulate=True,
                           mesh=mesh or {"dp": 2}, constraints=cons, micro_batches=m, **opts)


@pytest.mark.parametrize("name,m,mesh", CASES,
                         ids=[f"{n}-m{m}-{'x'.join(map(str, me.values()))}"
                              for n, m, me in CASES])
def test_step_equals_one_device_with_unevenly_ignored_tokens(name, m, mesh):
    model, cfg = make(name)
    ref = twin(model)
    data = batches(cfg, m)
    pm = compile_(model, data[0], m, mesh, name)
    assert pm.plan.micro_batches == m
    assert pm._program.input_shapes[0][1] == (BATCH // m, 8)  # planned on one micro-batch
    ph = [n for n in pm.rank_program(0).graph.nodes if n.op == "placeholder"]
    assert any(n.name.endswith("_whole") for n in ph), "the token count is not read whole"
    worst, launches = check_steps(pm, ref, data)
    assert worst <= 1e-5
    groups = len(set(pm._program.grad_sync.values()))
    assert launches == [groups] * STEPS  # one all-reduce per bucket per step, not m


def _launches(pm, run) -> int:
    count = count_launches(pm)
    run()
    return count[0]


def test_gradients_are_reduced_once_per_bucket_per_step():
    model, cfg = make("gpt")
    (tokens, targets), = batches(cfg, 4, count=1)
    pm = compile_(model, (tokens, targets), 4, {"dp": 2}, "gpt")
    assert pm._program.grad_sync, "the plan has no bucketed gradient sync to count"
    groups = len(set(pm._program.grad_sync.values()))
    # one backward over the whole batch (the module called) sums each bucket once
    assert _launches(pm, lambda: pm(tokens, targets).backward()) == groups
    assert _launches(pm, lambda: pm.step(tokens, targets)) == groups
    # many small buckets: a step launches as many as one backward, not 4 times as many
    from autopar.runtime import grad_sync
    old, grad_sync.BUCKET_BYTES = grad_sync.BUCKET_BYTES, 4096
    try:
        once = _launches(pm, lambda: pm(tokens, targets).backward())
        assert once > groups
        assert _launches(pm, lambda: pm.step(tokens, targets)) == once
    finally:
        grad_sync.BUCKET_BYTES = old


def test_step_adds_to_gradients_held_before_it():
    model, cfg = make("gpt")
    ref = twin(model)
    (tokens, targets), = batches(cfg, 2, count=1)
    pm = compile_(model, (tokens, targets), 2, {"dp": 2}, "gpt")
    for _ in range(2):  # no zero_grad between: gradients accumulate over steps
        pm.step(tokens, targets)
        ref(tokens, targets).backward()
    grads = pm.full_grad_dict()
    for fqn, p in ref.named_parameters():
        assert_close(grads[fqn], p.grad, fqn, 1e-2 * p.grad.abs().max().item())


class Regularized(nn.Module):
    """A language-model loss plus a penalty on some weights: the penalty does not depend on
    the batch, so a step must count it once, not once per micro-batch."""

    def __init__(self, cfg):
        super().__init__()
        self.lm = GPT(cfg)

    def forward(self, idx, targets):
        penalty = sum(b.mlp.c_fc.weight.pow(2).sum() for b in self.lm.h)
        return self.lm(idx, targets) + 0.5 * penalty


def test_batch_independent_term_counts_once_per_step():
    torch.manual_seed(0)
    cfg = GPTConfig()
    model = Regularized(cfg)
    ref = twin(model)
    data = batches(cfg, 2, count=2)
    pm = compile_(model, data[0], 2)
    assert pm._micro.first_flag
    assert FIRST_FLAG in [n.name for n in pm.rank_program(0).graph.nodes]
    worst, _ = check_steps(pm, ref, data)
    assert worst <= 1e-5


def test_calling_the_module_gives_the_full_batch_outputs():
    model, cfg = make("llama")
    ref = twin(model)
    (tokens, targets), = batches(cfg, 2, count=1)
    pm = compile_(model, (tokens, targets), 2, {"dp": 2}, "llama")
    loss = pm(tokens, targets)
    want = ref(tokens, targets)
    assert_close(loss, want, "loss")
    loss.backward()
    want.backward()
    grads = pm.full_grad_dict()
    for fqn, p in ref.named_parameters():
        assert_close(grads[fqn], p.grad, fqn, 1e-2 * p.grad.abs().max().item())
    # an output split over the batch comes back concatenated
    logits_pm = compile_(twin(ref), (tokens,), 2)
    assert logits_pm._micro.outputs == [("cat", 0)]
    assert_close(logits_pm(tokens), ref(tokens), "logits")


def test_lazy_module_plans_at_its_first_step():
    model, cfg = make("gpt")
    ref = twin(model)
    (tokens, targets), = batches(cfg, 2, count=1)
    lazy = autopar.compile(model, slow_devices(2), simulate=True, mesh={"dp": 2},
                           micro_batches=2)
    loss = lazy.step(tokens, targets)
    assert lazy.plan.micro_batches == 2
    assert_close(loss, ref(tokens, targets).detach(), "loss")


def test_micro_batches_must_divide_the_batch():
    model, cfg = make("gpt")
    tokens, targets = tiny_batch(cfg, batch=BATCH)
    with pytest.raises(PlanError, match=r"micro_batches=3 does not divide the batch of 8 "
                                        r"\(dim 0 of input 'idx'\).*\[1, 2, 4, 8\]"):
        compile_(model, (tokens, targets), 3)


class SquaredLoss(nn.Module):
    """A loss that is a non-linear function of the batch's mean: its gradient over the batch
    is not the sum of the micro-batches' gradients."""

    def __init__(self, cfg):
        super().__init__()
        self.lm = GPT(cfg)

    def forward(self, idx, targets):
        return self.lm(idx, targets) ** 2


def test_a_step_that_does_not_split_is_refused_and_runs_whole():
    torch.manual_seed(0)
    cfg = GPTConfig()
    model = SquaredLoss(cfg)
    ref = twin(model)
    tokens, targets = tiny_batch(cfg, batch=BATCH)
    with pytest.raises(PlanError, match=r"(?s)does not split into micro-batches.*pow.*"
                                        r"requires grad.*micro_batches=1 runs it"):
        compile_(model, (tokens, targets), 2)
    pm = compile_(model, (tokens, targets), 1)
    assert pm._micro is None
    assert_close(pm.step(tokens, targets), ref(tokens, targets).detach(), "loss")


def test_whole_batch_values_read_from_the_inputs_alone():
    class Normalized(nn.Module):
        """Targets weighted by the batch's largest logit: a whole-batch value of the model's
        parameters, which the micro-batches cannot compute before they run."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, y):
            scale = self.fc(x).detach().amax()
            return F.cross_entropy(self.fc(x), y) * scale

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(PlanError, match=r"reads the model's 'fc\..*micro_batches=1"):
        autopar.compile(Normalized(), slow_devices(2), example_inputs=(x, y), simulate=True,
                        micro_batches=2)
