"""The public API: compile in its three forms, plan, examine, Plan, ParallelModule's methods,
meta-device planning, Dynamo capture, and clear errors for bad input."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autopar
from autopar import Cluster, InputError, Partial, PlanError, Replicate, Shard
from models import MLP, GPT, GPTConfig, Llama, LlamaConfig, tiny_batch

X = torch.randn(8, 16)


def test_plan_covers_every_parameter_input_and_op():
    plan = autopar.plan(MLP(), Cluster.local(4), example_inputs=(X,))
    assert math.prod(plan.mesh.values()) == 4 and len(plan.mesh) <= 3
    assert set(plan.placements) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert set(plan.inputs) == {"x"}
    assert {v["op"] for v in plan.nodes.values()} == {"linear", "relu"}
    assert plan.cost.total_s > 0 and plan.cost.memory_bytes_per_device > 0


def test_inputs_can_be_constrained_by_argument_name():
    plan = autopar.plan(MLP(), Cluster.local(4, measure=False), example_inputs=(X,),
                        mesh={"dp": 4}, constraints={"x": "S(0)", "fc*": "R"})
    assert plan.inputs == {"x": (Shard(0),)}
    assert all(layout == (Replicate(),) for layout in plan.placements.values())


def test_constraints_are_pinned_and_propagated():
    plan = autopar.plan(MLP(), Cluster.local(2), example_inputs=(X,), mesh={"tp": 2},
                        constraints={"fc1.*": "S(0)", "fc2.weight": (Shard(1),)})
    assert plan.placements["fc1.weight"] == (Shard(0),)
    assert plan.placements["fc1.bias"] == (Shard(0),)
    assert plan.placements["fc2.weight"] == (Shard(1),)
    ops = {v["op"]: v for v in plan.nodes.values()}
    assert ops["relu"]["output"] == (Shard(1),)          # column-parallel output stays split
    assert plan.inputs["x"] == (Replicate(),)             # no free axis for data parallel


def test_plan_round_trips_through_json():
    plan = autopar.plan(MLP(), Cluster.local(4), example_inputs=(X,), mesh={"dp": 2, "tp": 2},
                        constraints={"fc1.weight": (Replicate(), Shard(0))})
    again = autopar.Plan.from_json(plan.to_json())
    assert again.placements == plan.placements and again.nodes == plan.nodes
    assert again.fingerprint() == plan.fingerprint()
    assert json.loads(plan.to_json())["placements"]["fc1.weight"] == "RS(0)"
    assert "fc1.weight" in plan.explain() and "relu" in plan.explain(per="op")


def test_meta_device_model_plans_without_memory():
    with torch.device("meta"):
        model = Llama(LlamaConfig(dim=4096, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                                  vocab_size=128256, n_layers=2, max_seq_len=64))
    tokens = torch.zeros(8, 64, dtype=torch.long, device="meta")
    plan = autopar.plan(model, Cluster.preset("dgx-h100"), example_inputs=(tokens,),
                        level="fast")
    assert math.prod(plan.mesh.values()) == 8
    assert "layers.1.feed_forward.w2.weight" in plan.placements
    with pytest.raises(PlanError, match="meta device"):
        autopar.compile(model, Cluster.preset("dgx-h100"), example_inputs=(tokens,),
                        simulate=True)


def test_dynamo_capture_maps_parameters_back_to_fqns():
    model = Llama()  # slices a buffer by a traced size: fx.symbolic_trace fails, Dynamo works
    tokens, _ = tiny_batch(model.cfg)
    pm = autopar.compile(model, Cluster.local(2), example_inputs=(tokens,), simulate=True)
    assert pm.plan.stats["capture_method"] == "dynamo"
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert set(pm.plan.placements) <= names
    torch.testing.assert_close(pm(tokens), model(tokens), rtol=1e-5, atol=1e-6)


def test_keyword_inputs_and_dict_outputs():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 4)

        def forward(self, x, scale=None, *, bias):
            y = self.proj(x) + bias
            return {"y": y, "aux": (y.sum(), x.shape[0])}

    model = Head()
    bias = torch.randn(4)
    pm = autopar.compile(model, Cluster.local(2), example_inputs={"x": X, "bias": bias},
                         simulate=True)
    out, want = pm(x=X, bias=bias), model(X, bias=bias)
    assert set(out) == {"y", "aux"} and out["aux"][1] == 8
    torch.testing.assert_close(out["y"], want["y"])
    torch.testing.assert_close(out["aux"][0], want["aux"][0])


def test_decorator_on_module_class_plans_at_first_call():
    cluster = Cluster.local(2)

    @autopar.compile(cluster=cluster, simulate=True)
    class Net(MLP):
        pass

    net = Net()
    with pytest.raises(PlanError, match="first call"):
        net.parameters()
    out = net(X)
    assert out.shape == (8, 8)
    assert net.plan.mesh == {"dp": 2}
    assert len(list(net.parameters())) == 2 * 4          # 4 tensors on each of 2 ranks


def test_decorator_on_function_with_example_inputs_plans_at_once():
    @autopar.compile(cluster=Cluster.local(2), simulate=True, example_inputs=(X, X))
    def f(a, b):
        return torch.tanh(a) * b

    assert isinstance(f.plan, autopar.Plan) and set(f.plan.inputs) == {"a", "b"}
    torch.testing.assert_close(f(X, X), torch.tanh(X) * X)


def test_lazy_function_plans_again_for_new_shapes():
    f = autopar.compile(lambda a: F.softmax(a, dim=-1).sum(0), Cluster.local(2), simulate=True)
    for rows in (8, 4):
        a = torch.randn(rows, 16)
        torch.testing.assert_close(f(a), F.softmax(a, dim=-1).sum(0))


def test_code_is_readable_python_with_layouts():
    pm = autopar.compile(MLP(), Cluster.local(2), example_inputs=(X,), simulate=True,
                         mesh={"tp": 2}, constraints={"fc1.*": "S(0)", "fc2.weight": "S(1)"})
    code = pm.code
    compile(code, "<rank program>", "exec")
    assert "# S(0)" in code and "to_partial" in code and "all_reduce" in code
    gm = pm.rank_program(1)
    assert isinstance(gm, torch.fx.GraphModule)
    assert gm.fc1_weight.shape == (32, 16)
    with pytest.raises(PlanError, match="outside the mesh"):
        pm.rank_program(2)


def test_full_state_dict_round_trip():
    model = MLP()
    pm = autopar.compile(model, Cluster.local(4), example_inputs=(X,), simulate=True,
                         mesh={"dp": 2, "tp": 2},
                         constraints={"fc1.weight": (Replicate(), Shard(0))})
    state = pm.full_state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(state[k], v)
    new = {k: torch.randn_like(v) for k, v in state.items()}
    pm.load_full_state_dict(new)
    for k, v in pm.full_state_dict().items():
        torch.testing.assert_close(v, new[k])
    assert pm.rank_program(1).fc1_weight.shape == (32, 16)


def test_full_state_dict_names_a_tied_weight_as_the_model_does():
    """GPT's LM head shares the token embedding: the gathered state dict holds it under
    both names and loads strictly into a fresh model."""
    model = GPT(GPTConfig())
    pm = autopar.compile(model, Cluster.local(2), example_inputs=tiny_batch(model.cfg),
                         simulate=True)
    state = pm.full_state_dict()
    assert set(state) == set(model.state_dict())
    assert state["lm_head.weight"] is state["wte.weight"]
    GPT(GPTConfig()).load_state_dict(state, strict=True)


def test_examine_lists_ops_without_rules_with_locations():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return torch.special.i0(self.fc(x))

    report = autopar.examine(Odd(), example_inputs=(X,))
    assert not report.ok
    [(op, target, path, loc)] = report.unsupported
    assert op == "i0" and loc.startswith("test_api.py:")
    assert "i0" in str(report) and report.op_counts["linear"] == 1
    with pytest.warns(UserWarning, match="no sharding rule for i0"):
        pm = autopar.compile(Odd(), Cluster.local(2), example_inputs=(X,), simulate=True)
    assert pm(X).shape == (8, 16)


def test_a_decision_on_values_of_the_data_names_its_line_and_the_remedy():
    """DeBERTa-v2's classification loss branches on the size of a nonzero: neither capture
    can plan it, and the error names the user's line and what to do."""
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x, labels):
            picked = (labels >= 0).nonzero()
            if picked.size(0) > 0:
                return self.fc(x)[picked[:, 0]].sum()
            return self.fc(x).sum()

    with pytest.raises(autopar.CaptureError, match=r"test_api.py:\d+ in forward: "
                       r"`if picked.size\(0\) > 0:`.*nonzero.*outside the model"):
        autopar.plan(Picky(), Cluster.local(2, measure=False),
                     example_inputs=(X, torch.arange(8)))


def test_a_model_that_raises_on_its_inputs_says_what_it_raises_and_where():
    """A config without the field forward reads (transformers' T5 from a bare config lacks
    its decoder_start_token_id): the model's own exception, with its line."""
    class Configured(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(width=16)
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(x) * self.config.scale

    with pytest.raises(autopar.CaptureError, match=r"test_api.py:\d+ in forward: .*the model "
                       r"raises AttributeError.*'scale'.*fix what it says"):
        autopar.plan(Configured(), Cluster.local(2, measure=False), example_inputs=(X,))


def test_examine_gives_the_share_of_flops_ops_without_rules_hold():
    """A chain of matmuls without a rule (multi_dot, counted by torch's FLOP counter: it
    multiplies w and v first) beside one with a rule: the report gives each one's share."""
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.v = nn.Parameter(torch.randn(16, 32)), nn.Parameter(torch.randn(32, 8))

        def forward(self, x):
            return torch.linalg.multi_dot([x, self.w, self.v]).sum() + (x @ self.w).sum()

    x = torch.randn(64, 16)
    report = autopar.examine(Chain(), example_inputs=(x,))
    chain, product = 2 * 16 * 32 * 8 + 2 * 64 * 16 * 8, 2 * 64 * 16 * 32
    assert report.flops["multi_dot"] == chain and report.flops["matmul"] == product
    assert report.replicated_flops_share == pytest.approx(chain / report.total_flops)
    assert 0.25 < report.replicated_flops_share < 0.3
    assert f"multi_dot: {chain / report.total_flops:.1%} of the FLOPs" in str(report)


def test_cluster_presets_and_files(tmp_path):
    c = Cluster.preset("dgx-a100", nodes=2)
    assert c.world_size == 16 and c.devices()[0].name == "A100-80GB"
    assert Cluster.preset("dgx-h100", devices_per_node=4).world_size == 4
    path = tmp_path / "cluster.yaml"
    path.write_text("nodes:\n  - {device: A100-80GB, count: 8}\n  - {device: MyAccel, count: 4}\n"
                    "links:\n  inter_node: {bandwidth_GBps: 25, latency_us: 5}\n"
                    "devices:\n  MyAccel: {peak_tflops: {fp32: 60}, memory_GB: 96, "
                    "memory_bandwidth_GBps: 4000}\n")
    c = Cluster.load(path)
    assert c.world_size == 12 and c.devices()[-1].memory_bytes == 96e9
    with pytest.raises(PlanError, match="unknown device type 'A100'"):
        Cluster.from_dict({"nodes": [{"device": "A100", "count": 8}]})
    with pytest.raises(PlanError, match="unknown cluster preset"):
        Cluster.preset("dgx-a1000")


# -- bad input: a clear error naming the value and a remedy ------------------------------------

def test_constraint_matching_nothing_lists_closest_names():
    with pytest.raises(PlanError,
                       match=r"'fc3\.weight' matches no parameter or input.*'fc1\.weight'"):
        autopar.plan(MLP(), Cluster.local(2), example_inputs=(X,),
                     constraints={"fc3.weight": (Shard(0),)})


@pytest.mark.parametrize("layout,message", [
    ((Shard(0), Replicate()), "has 2 placements but mesh"),
    ((Partial(),), "cannot be Partial"),
    ((Shard(1),), "does not split fc1.weight of shape \\(64, 16\\) evenly"),
    ("X(0)", "cannot parse layout"),
])
def test_bad_constraint_layouts(layout, message):
    with pytest.raises(PlanError, match=message):
        autopar.plan(MLP(), Cluster.local(3), example_inputs=(torch.randn(9, 16),),
                     constraints={"fc1.weight": layout})


def test_mesh_size_must_match_cluster():
    with pytest.raises(PlanError, match="has 4 devices but the cluster .* has 2"):
        autopar.plan(MLP(), Cluster.local(2), example_inputs=(X,), mesh={"dp": 2, "tp": 2})


def test_inputs_not_matching_signature():
    with pytest.raises(InputError, match="forward signature"):
        autopar.plan(MLP(), Cluster.local(2), example_inputs=(X, X))
    with pytest.raises(InputError, match="tuple .* or a dict"):
        autopar.plan(MLP(), Cluster.local(2), example_inputs=3)


def test_call_with_other_shape_is_a_clear_error():
    pm = autopar.compile(MLP(), Cluster.local(2), example_inputs=(X,), simulate=True)
    with pytest.raises(InputError, match=r"input 'x': planned for shape \(8, 16\)"):
        pm(torch.randn(4, 16))


def test_distributed_mode_needs_a_process_group():
    with pytest.raises(PlanError, match="torchrun"):
        autopar.compile(MLP(), Cluster.local(2), example_inputs=(X,))


def test_inplace_write_into_parameter_is_refused():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16))

        def forward(self, x):
            self.w.add_(1)
            return x * self.w

    with pytest.raises(autopar.CaptureError, match="in-place op add_ writes into"):
        autopar.plan(Bad(), Cluster.local(2), example_inputs=(X,))


def test_gpt_with_tied_embeddings_shares_one_parameter():
    model = GPT(GPTConfig())
    tokens, targets = tiny_batch(model.cfg)
    pm = autopar.compile(model, Cluster.local(2), example_inputs=(tokens, targets),
                         simulate=True)
    assert "wte.weight" in pm.plan.placements and "lm_head.weight" not in pm.plan.placements


def test_memory_budget_is_enforced():
    model = MLP()  # 16*64 + 64 + 64*8 + 8 = 1608 parameters; with AdamW 16 bytes each
    with pytest.raises(PlanError, match=r"no plan fits in 9\.77 KiB per device .* every plan "
                                        r"needs at least"):
        autopar.plan(model, Cluster.local(2, measure=False), example_inputs=(X,),
                     memory_budget_bytes=10_000, constraints={"*": "R"})
    plan = autopar.plan(model, Cluster.local(2, measure=False), example_inputs=(X,),
                        memory_budget_bytes=30_000)
    assert plan.cost.memory_bytes_per_device <= 30_000


def test_transformers_model_output_comes_back_whole():
    import transformers
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (4, 8))
    pm = autopar.compile(model, Cluster.local(2), example_inputs={"input_ids": ids, "labels": ids},
                         simulate=True)
    out, want = pm(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
    assert type(out) is type(want)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-6)


def test_plain_function_fx_cannot_trace_goes_through_dynamo():
    def pad(x):
        return torch.cat([x, torch.zeros(x.size(0), 4)], 1)

    x = torch.randn(4, 8)
    pm = autopar.compile(pad, Cluster.local(2), example_inputs=(x,), simulate=True)
    assert pm.plan.stats["capture_method"] == "dynamo"
    torch.testing.assert_close(pm(x), pad(x))
