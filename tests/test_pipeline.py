"""Pipeline stages: the zoo models cut into uneven stages, under every schedule, on meshes
with a "pp" axis, step for step equal to one device (loss, every gradient, parameters after
AdamW steps), in simulated mode; the schedules' orders and their played step times; and the
errors for stage requests that cannot work."""

from __future__ import annotations

import pytest
import torch

import autopar
from autopar import PlanError
from autopar.search import stages as S
from equivalence import check_steps, twin, uneven_targets
from models import GPT, Bert, BertConfig, GPTConfig, Llama, LlamaConfig, tiny_batch
from test_e2e_simulated import megatron

BATCH = 8
STEPS = 3


def make(name, layers):
    torch.manual_seed(0)
    if name == "gpt":
        cfg = GPTConfig(n_layer=layers)
        return GPT(cfg), cfg
    if name == "llama":
        cfg = LlamaConfig(n_layers=layers)
        return Llama(cfg), cfg
    cfg = BertConfig(n_layers=layers)
    return Bert(cfg), cfg


def batches(name, cfg, m, count=STEPS):
    out = []
    for s in range(count):
        tokens, targets = tiny_batch(cfg, batch=BATCH, seed=s)
        if name == "bert":
            mask = torch.ones_like(tokens)
            mask[1, 5:] = 0
            labels = torch.arange(BATCH) % 4
            types = (torch.arange(tokens.shape[1]) >= 4).long().expand_as(tokens).clone()
            out.append(((), dict(input_ids=tokens, attention_mask=mask, token_type_ids=types,
                                 labels=labels)))
        else:
            out.append(((tokens, uneven_targets(targets, m)), {}))
    return out


# (model, layers, mesh, stages (layers per stage), schedule, micro-batches)
CASES = [
    ("gpt", 4, {"pp": 2, "dp": 2}, (1, 3), "1f1b", 2),
    ("gpt", 4, {"pp": 2, "tp": 2}, (3, 1), "gpipe", 4),
    ("gpt", 6, {"pp": 2, "dp": 2}, (1, 2, 2, 1), "interleaved-1f1b", 2),
    ("llama", 4, {"pp": 2, "dp": 2}, (3, 1), "1f1b", 4),
    ("llama", 4, {"pp": 4}, (1, 1, 1, 1), "1f1b", 4),
    ("llama", 5, {"pp": 2, "tp": 2}, (2, 1, 1, 1), "interleaved-1f1b", 4),
    ("bert", 4, {"pp": 2, "dp": 2}, (1, 3), "gpipe", 2),
    ("bert", 4, {"pp": 2, "tp": 2}, (2, 2), "1f1b", 2),
]


@pytest.mark.parametrize("name,layers,mesh,split,schedule,m", CASES,
                         ids=[f"{c[0]}-{'x'.join(f'{k}{v}' for k, v in c[2].items())}-"
                              f"{'.'.join(map(str, c[3]))}-{c[4]}-m{c[5]}" for c in CASES])
def test_pipelined_steps_equal_one_device(name, layers, mesh, split, schedule, m):
    model, cfg = make(name, layers)
    ref = twin(model)
    data = batches(name, cfg, m)
    args, kwargs = data[0]
    cons = megatron(name, {a: n for a, n in mesh.items() if a != "pp"}) \
        if "tp" in mesh else None
    pm = autopar.compile(model, autopar.Cluster.local(4, measure=False),
                         example_inputs=kwargs or args, simulate=True, mesh=mesh,
                         constraints=cons, stages=split, schedule=schedule, micro_batches=m)
    plan = pm.plan
    assert plan.mesh == mesh
    assert [len(st["layers"]) for st in plan.stages] == list(split)
    assert plan.schedule.startswith(schedule)
    assert plan.micro_batches == m
    if kwargs:   # one batch of keyword arguments, stepped on three times
        worst, _ = check_steps(pm, ref, [()] * STEPS, kwargs=kwargs)
    else:
        worst, _ = check_steps(pm, ref, [a for a, _ in data])
    assert worst <= 1e-5


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2)])
@pytest.mark.parametrize("p,m", [(2, 4), (4, 4), (4, 8)])
def test_a_schedule_played_on_equal_stages_takes_its_known_step(schedule, v, p, m):
    """Equal stages of forward f and backward b per micro-batch, links free: GPipe and 1F1B
    take (m + p - 1)(f + b); interleaved with v chunks (m + p - 1)(f + b) / v at most, and
    its bubble is smaller. 1F1B's stage i holds min(p - i, m) micro-batches, GPipe's all m."""
    n = p * v
    f, b = 1.0 / v, 2.0 / v
    played = S.play(S.schedule_orders(schedule, p, v, m), [f] * n, [b] * n, [0.0] * n)
    ideal = (m + p - 1) * 3.0
    if v == 1:
        assert played.step_s == pytest.approx(ideal)
    else:
        assert m * 3.0 < played.step_s < ideal
    if schedule == "1f1b":
        assert played.in_flight == [min(p - i, m) for i in range(p)]
    if schedule == "gpipe":
        assert played.in_flight == [m] * p
    assert sum(len(o) for o in S.schedule_orders(schedule, p, v, m)) == 2 * n * m


def test_a_slow_link_between_stages_is_paid_once_per_hop_each_way():
    played = S.play(S.schedule_orders("gpipe", 2, 1, 1), [1.0, 1.0], [2.0, 2.0], [0.5])
    assert played.step_s == pytest.approx(1 + 0.5 + 1 + 2 + 0.5 + 2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mesh={"pp": 8}), r"8 pipeline stages \(pp=8\) but the program has only 4 layers"),
    (dict(mesh={"pp": 2, "dp": 2}, schedule="1f1b", micro_batches=1),
     "'1f1b' with 2 stages needs at least 2 micro-batches, got 1"),
    (dict(mesh={"pp": 2, "dp": 2}, stages=(1, 1, 2)), r"3 stages given.*make 2"),
    (dict(mesh={"pp": 2, "dp": 2}, stages=(1, 2)), r"stages=\[1, 2\].*4 in all"),
    (dict(mesh={"pp": 2, "dp": 2}, schedule="interleaved-1f1b", micro_batches=1),
     "'interleaved-1f1b' with 2 stages needs at least 2"),
    (dict(mesh={"pp": 3, "dp": 1}), "pp=3 does not cut"),
])
def test_a_pipeline_that_cannot_work_is_refused_with_what_would(kwargs, message):
    model, cfg = make("gpt", 4)
    tokens, targets = tiny_batch(cfg, batch=BATCH)
    cluster = autopar.Cluster.local(4, measure=False)
    with pytest.raises(PlanError, match=message):
        autopar.plan(model, cluster, example_inputs=(tokens, targets), **kwargs)
