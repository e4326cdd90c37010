"""Pipeline stages: the zoo models cut into uneven stages, under every schedule, on meshes
with a "pp" axis, step for step equal to one device (loss, every gradient, parameters after
AdamW steps), in simulated mode; the schedules' orders and their played step times; and the
errors for stage requests that cannot work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import autopar
from autopar import PlanError
from autopar.search import stages as S
from equivalence import GRAD_FLOOR, assert_close, check_steps, twin, uneven_targets
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
    if all(n == 1 for a, n in mesh.items() if a != "pp"):
        # a stage of one device: whatever the layouts say, no rank program moves a value
        # between ranks but through the pipeline's sends
        assert "autopar_runtime_collectives" not in pm.code
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


# -- the planner ---------------------------------------------------------------------------------

def _meta_gpt(layers=6):
    cfg = GPTConfig(n_layer=layers, n_embd=256, n_head=8, block_size=128, vocab_size=1024)
    with torch.device("meta"):
        model = GPT(cfg)
    idx = torch.zeros(8, 128, dtype=torch.long, device="meta")
    return model, (idx, idx.clone())


def _two_nodes(fast_tflops, slow_tflops, inter_gbps, per_node=2):
    devices = {"Fast": {"peak_tflops": {"fp32": fast_tflops}, "memory_GB": 16,
                        "memory_bandwidth_GBps": 900},
               "Slow": {"peak_tflops": {"fp32": slow_tflops}, "memory_GB": 16,
                        "memory_bandwidth_GBps": 900}}
    return autopar.Cluster.from_dict({
        "nodes": [{"device": "Fast", "count": per_node}, {"device": "Slow", "count": per_node}],
        "links": {"intra_node": {"bandwidth_GBps": 100, "latency_us": 2},
                  "inter_node": {"bandwidth_GBps": inter_gbps, "latency_us": 10}},
        "devices": devices})


def test_faster_devices_take_more_layers_and_the_plan_beats_the_even_split():
    model, args = _meta_gpt()
    cluster = _two_nodes(fast_tflops=40, slow_tflops=10, inter_gbps=25)
    plan = autopar.plan(model, cluster, example_inputs=args, mesh={"pp": 2, "dp": 2})
    by_device = {st["device"].split(" x ")[0]: len(st["layers"]) for st in plan.stages}
    assert by_device["Fast"] > by_device["Slow"], plan.explain()
    even = autopar.plan(model, cluster, example_inputs=args, mesh={"pp": 2, "dp": 2},
                        stages=(3, 3), schedule=plan.schedule,
                        micro_batches=plan.micro_batches)
    assert plan.cost.total_s <= even.cost.total_s * (1 + 1e-9)
    # the plan's own account: a stage per group of devices, their memory within each device's
    assert sorted(tuple(st["ranks"]) for st in plan.stages) == [(0, 1), (2, 3)]
    assert all(st["memory_bytes"] <= 16e9 for st in plan.stages)
    assert "pipeline: 2 stages" in plan.explain()
    again = autopar.Plan.from_json(plan.to_json())
    assert again.stages == plan.stages and again.schedule == plan.schedule


def test_a_slow_link_between_nodes_gets_a_stage_per_node_and_fast_links_none():
    """GPT-2-medium-wide layers on two nodes of two devices: at 2 GB/s between the nodes a
    stage per node (only activations cross), faster than every plan of one stage; at 400 GB/s
    one stage over all four devices."""
    cfg = GPTConfig(n_layer=6, n_embd=1024, n_head=16, block_size=512, vocab_size=8192)
    with torch.device("meta"):
        model = GPT(cfg)
    idx = torch.zeros(16, 512, dtype=torch.long, device="meta")
    slow_cluster = _two_nodes(100, 100, inter_gbps=2)
    slow = autopar.plan(model, slow_cluster, example_inputs=(idx, idx))
    assert slow.mesh.get("pp") == 2, slow.explain()
    assert [tuple(st["ranks"]) for st in slow.stages] == [(0, 1), (2, 3)]
    assert slow.stats["pipeline_floor_s"][2] <= slow.cost.total_s
    for mesh in ({"dp": 4}, {"dp": 2, "tp": 2}, {"tp": 4}):
        flat = autopar.plan(model, slow_cluster, example_inputs=(idx, idx), mesh=mesh)
        assert slow.cost.total_s < flat.cost.total_s, mesh
    fast = autopar.plan(model, _two_nodes(100, 100, inter_gbps=400, per_node=1),
                        example_inputs=(idx, idx))
    assert "pp" not in fast.mesh and not fast.stages


def test_a_model_one_node_cannot_hold_gets_a_stage_per_node():
    """48 layers of width 4096 (9.7B parameters: 155 GB of weights, gradients and AdamW
    states) on two nodes of four 40 GB devices joined by 12.5 GB/s: a stage per node holds
    half the layers on its own devices, with no recomputation, faster than one stage."""
    cfg = GPTConfig(n_layer=48, n_embd=4096, n_head=32, block_size=1024, vocab_size=8192)
    with torch.device("meta"):
        model = GPT(cfg)
    idx = torch.zeros(8, 1024, dtype=torch.long, device="meta")
    cluster = autopar.Cluster.from_dict({
        "nodes": [{"device": "A100-40GB", "count": 4}] * 2,
        "links": {"intra_node": {"bandwidth_GBps": 300, "latency_us": 2},
                  "inter_node": {"bandwidth_GBps": 12.5, "latency_us": 10}}})
    plan = autopar.plan(model, cluster, example_inputs=(idx, idx))
    assert plan.mesh.get("pp") == 2, plan.explain()
    assert all(st["memory_bytes"] <= st["budget_bytes"] for st in plan.stages)
    assert set(plan.recompute.values()) == {"none"}
    for mesh in ({"dp": 2, "tp": 4}, {"dp": 8}):
        try:
            flat = autopar.plan(model, cluster, example_inputs=(idx, idx), mesh=mesh)
        except autopar.NoFit:
            continue
        assert plan.cost.total_s < flat.cost.total_s, mesh


def test_gradients_accumulated_over_steps_stay_exact_for_a_tied_weight():
    """Two steps without zero_grad: every gradient, the tied embedding's copies with them,
    is the sum of both batches' (as one device's accumulates)."""
    model, cfg = make("gpt", 4)
    ref = twin(model)
    data = [a for a, _ in batches("gpt", cfg, 2, count=2)]
    pm = autopar.compile(model, autopar.Cluster.local(4, measure=False),
                         example_inputs=data[0], simulate=True, mesh={"pp": 2, "dp": 2},
                         stages=(1, 3), micro_batches=2)
    for batch in data:
        pm.step(*batch)
        ref(*batch).backward()
    grads = pm.full_grad_dict()
    floor = GRAD_FLOOR * max(p.grad.abs().max().item() for p in ref.parameters())
    for fqn, p in ref.named_parameters():
        assert_close(grads[fqn], p.grad, f"accumulated grad {fqn}", floor)
    first, last = pm.stages[0], pm.stages[-1]
    name_first = next(n for n, (f, _) in first._program.attrs.items() if f == "wte.weight")
    name_last = next(n for n, (f, _) in last._program.attrs.items() if f == "wte.weight")
    assert torch.equal(first._gather([x.grad for x in first._per_rank(name_first)],
                                     first._program.attrs[name_first][1]),
                       last._gather([x.grad for x in last._per_rank(name_last)],
                                    last._program.attrs[name_last][1]))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_transformers_decoder_pipelined_equals_one_device(family):
    """Dynamo-captured transformers decoders with padded sequences: their rotary tables and
    attention mask, built before the first layer, are handed on to every stage."""
    import test_hf
    model, kwargs = test_hf.make(family)
    kwargs = test_hf.padded(kwargs)
    ref = twin(model)
    pm = autopar.compile(model, autopar.Cluster.local(4, measure=False), example_inputs=kwargs,
                         simulate=True, mesh={"pp": 2, "dp": 2}, micro_batches=2)
    assert [len(st["layers"]) for st in pm.plan.stages] == [1, 1]
    worst, _ = check_steps(pm, ref, [()] * STEPS, kwargs=kwargs,
                           adamw=dict(lr=1e-3, eps=1e-3))
    assert worst <= 1e-5


def test_the_torch_compile_backend_refuses_pipeline_stages_saying_where_they_run():
    with pytest.raises(PlanError, match="autopar.compile"):
        autopar.backend(autopar.Cluster.local(4, measure=False), mesh={"pp": 2, "dp": 2})


def test_alike_middle_stages_are_solved_once_and_run_as_their_own():
    """Four stages of 1, 2, 2 and 1 layers: the two middle stages are one program under other
    names (layers 1-2 and 3-4), so the second takes the first's plan, node for node, under
    its own names, and the pipeline still steps as one device does."""
    model, cfg = make("llama", 6)
    ref = twin(model)
    data = batches("llama", cfg, 4)
    pm = autopar.compile(model, autopar.Cluster.local(8, measure=False),
                         example_inputs=data[0][0], simulate=True, mesh={"pp": 4, "dp": 2},
                         stages=(1, 2, 2, 1), schedule="1f1b", micro_batches=4)
    assert pm.plan.stats["pipeline"]["stage_plans"] == {"solved": 3, "carried": 1}
    second, third = pm.plan.stages[1], pm.plan.stages[2]
    assert second["layers"] == ["layers.1", "layers.2"] and \
        third["layers"] == ["layers.3", "layers.4"]
    rows = [[(r["op"], r["inputs"], r["output"], r["module"].split(".", 2)[-1])
             for name, r in pm.plan.nodes.items() if r["module"].startswith(prefix)]
            for prefix in ("layers.1.", "layers.3.")]
    assert rows[0] and rows[0] == rows[1]
    worst, _ = check_steps(pm, ref, [a for a, _ in data])
    assert worst <= 1e-5


def test_stage_counts_and_group_orders_scale_to_thousands_of_devices():
    """16,384 devices (2048 nodes of 8): the stage count tried is whole nodes per stage and no
    more stages than layers; 64 groups of one kind have one order, a mixed pipeline its
    distinct orders of kinds, rank order first."""
    cluster = autopar.Cluster.preset("dgx-h100", nodes=2048)
    counts = S.stage_counts(cluster, None, most=126)
    assert counts == [64]
    groups = S.groups_of(cluster, 64)
    assert all(len(g) == 256 and g.start % 8 == 0 for g in groups)
    assert S.stage_counts(cluster, None, most=0) == []
    assert S.group_orders(["H100"] * 64) == [list(range(64))]
    orders = S.group_orders(["V100", "T4", "V100"])
    assert orders == [[0, 1, 2], [0, 2, 1], [1, 0, 2]]
    mixed = autopar.Cluster.from_dict({
        "nodes": [{"device": "A100-40GB", "count": 4}, {"device": "A100-40GB", "count": 2}],
        "links": {"intra_node": {"bandwidth_GBps": 300, "latency_us": 2},
                  "inter_node": {"bandwidth_GBps": 12.5, "latency_us": 10}}})
    assert S.groups_of(mixed, 2) is None   # the second group would hold part of node 0
    assert S.groups_of(mixed, 3) == [range(0, 2), range(2, 4), range(4, 6)]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_no_pipeline_steps_faster_than_its_floor(schedule):
    """Uneven stages of random forward and backward times, random transfers and fixed
    times, played: never faster than the floor of the work they hold (a micro-batch's stage
    time on d devices, summed, times m and d), and the floor of equal stages over many
    micro-batches is within (p - 1) / m of the played step (it admits uneven stages)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        p = int(rng.integers(1, 7))
        m = int(rng.integers(p if schedule == "1f1b" else 1, 17))
        d = int(rng.integers(1, 5))
        f = rng.uniform(0.01, 1.0, p) * rng.choice([1.0, 10.0], p)
        b = f * rng.uniform(1.0, 3.0, p)
        transfer = (rng.uniform(0, 0.2, max(p - 1, 1)) * rng.integers(0, 2)).tolist()
        fixed = rng.uniform(0, 0.5, p).tolist()
        played = S.play(S.schedule_orders(schedule, p, 1, m), f.tolist(), b.tolist(),
                        transfer, fixed)
        work = m * d * float((f + b).sum())
        assert played.step_s >= S.pipeline_floor(work, p * d, p, m) * (1 - 1e-12)
    p, m = 4, 64
    played = S.play(S.schedule_orders(schedule, p, 1, m), [1.0] * p, [2.0] * p, [0.0] * p)
    floor = S.pipeline_floor(m * 3.0 * p, p, p, m)
    assert floor <= played.step_s <= floor * (1 + (p - 1) / m)


def test_a_plan_computes_at_least_the_work_floor():
    """However a plan splits the program's ops, its devices together compute for at least
    the work floor (each op whole at the fastest rates) and launch every op on every device
    once a micro-batch: the per-device compute of the plan on each mesh, times the devices,
    on a mixed cluster and in bf16 over two micro-batches."""
    from autopar.api import plan_micro_batches
    from autopar.cost.model import Training, work_floor_s
    model, args = _meta_gpt(4)
    for cluster, precision, m in ((_two_nodes(40, 10, 25), "fp32", 1),
                                  (autopar.Cluster.preset("dgx-h100", nodes=1), "bf16-mixed",
                                   2)):
        for mesh in ({"dp": cluster.world_size}, {"dp": 2, "tp": cluster.world_size // 2},
                     {"tp": cluster.world_size}):
            captured, ctx = plan_micro_batches(model, cluster, args, m, program=False,
                                               mesh=mesh, precision=precision)
            ops = [(n.meta["autopar.op"], n.meta["autopar.strategy"].spec.flops,
                    n.meta["autopar.strategy"].spec.num_bytes)
                   for n in captured.gm.graph.nodes
                   if n.op in ("call_function", "call_method")]
            work, dispatch = work_floor_s(ops, cluster, Training(precision, "adamw", m))
            assert 0 < work and 0 < dispatch
            assert work + dispatch * m * cluster.world_size <= \
                ctx.plan.cost.compute_s * cluster.world_size * (1 + 1e-12), mesh


def test_pipelines_that_cannot_beat_the_plan_of_one_stage_are_not_planned():
    """Two devices on two nodes joined by a fast link, long sequences, a batch of two: the
    floor of a pipeline of a stage per node (its bubble at the most micro-batches the search
    tries, two, with the work spread evenly) is above the plan of one stage, so no stage is
    planned. (Over a slow link the floor is below the pipeline kept: the test above.)"""
    cfg = GPTConfig(n_layer=6, n_embd=1024, n_head=16, block_size=4096, vocab_size=8192)
    with torch.device("meta"):
        model = GPT(cfg)
    idx = torch.zeros(2, 4096, dtype=torch.long, device="meta")
    fast = autopar.plan(model, _two_nodes(100, 100, inter_gbps=400, per_node=1),
                        example_inputs=(idx, idx))
    assert fast.stats["pipeline_floor_s"][2] >= fast.cost.total_s
    assert "pipeline" not in fast.stats and "pp" not in fast.mesh
