"""End to end, simulated: the model zoo on meshes (2,), (4,), (2, 2), with the default
(data-parallel) plan and with forced Megatron-style tensor parallel, matches one device in
outputs, every gradient, and parameters after an SGD and an AdamW step."""

from __future__ import annotations

import math

import pytest
import torch

import autopar
from autopar import Replicate, Shard, StridedShard
from equivalence import check_training, twin
from models import GPT, MLP, Bert, BertConfig, GPTConfig, Llama, LlamaConfig, tiny_batch

MESHES = {"2": {"tp": 2}, "4": {"tp": 4}, "2x2": {"dp": 2, "tp": 2}}

# Megatron: column-parallel (split output features) then row-parallel (split input features);
# GPT's fused query, key and value projection split strided (each rank its piece of each)
QKV = StridedShard(0, (1, 1, 1))
MEGATRON = {
    "mlp": {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1},
    "gpt": {"h.*.attn.c_attn.weight": QKV, "h.*.attn.c_attn.bias": QKV,
            "h.*.attn.c_proj.weight": 1,
            "h.*.mlp.c_fc.weight": 0, "h.*.mlp.c_fc.bias": 0, "h.*.mlp.c_proj.weight": 1},
    "llama": {"layers.*.attention.w[qkv].weight": 0, "layers.*.attention.wo.weight": 1,
              "layers.*.feed_forward.w[13].weight": 0, "layers.*.feed_forward.w2.weight": 1},
    "bert": {"layers.*.attention.query.*": 0, "layers.*.attention.key.*": 0,
             "layers.*.attention.value.*": 0, "layers.*.attention.dense.weight": 1,
             "layers.*.intermediate.*": 0, "layers.*.output.weight": 1},
}


def megatron(model_name, mesh):
    """Tensor parallel on the last mesh axis, replicated on any other."""
    out = {}
    for pattern, dim in MEGATRON[model_name].items():
        out[pattern] = tuple(Replicate() for _ in range(len(mesh) - 1)) + (
            Shard(dim) if isinstance(dim, int) else dim,)
    return out


def slow_devices(n):
    """Slow devices on fast links: splitting every op's work pays."""
    return autopar.Cluster.from_dict({
        "nodes": [{"device": "Slow", "count": n}],
        "links": {"intra_node": {"bandwidth_GBps": 1000, "latency_us": 0}},
        "devices": {"Slow": {"peak_tflops": {"fp32": 0.001}, "memory_GB": 1,
                             "memory_bandwidth_GBps": 1}}})


SHARDED_INPUTS = {"mlp": {"x": "S(0)"}, "gpt": {"idx": "S(0)", "targets": "S(0)"},
                  "llama": {"tokens": "S(0)", "targets": "S(0)"}}


def fn(x, w1, w2):
    return torch.tanh(x @ w1) @ w2


def make(name):
    torch.manual_seed(0)
    if name == "mlp":
        return MLP(), (torch.randn(8, 16),), {}
    if name == "gpt":
        cfg = GPTConfig()
        return GPT(cfg), tiny_batch(cfg), {}
    if name == "llama":
        cfg = LlamaConfig()
        return Llama(cfg), tiny_batch(cfg), {}
    if name == "bert":
        cfg = BertConfig()
        ids, _ = tiny_batch(cfg)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        types = (torch.arange(8) >= 4).long().expand(4, 8).clone()
        labels = torch.tensor([0, 1, 2, 3])
        return Bert(cfg), (), dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                                   labels=labels)
    raise KeyError(name)


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("plan", ["default", "megatron"])
@pytest.mark.parametrize("name", ["mlp", "gpt", "llama", "bert"])
def test_model_matches_one_device(name, plan, mesh):
    model, args, kwargs = make(name)
    ref = twin(model)
    axes = MESHES[mesh]
    opts = dict(mesh=axes) if plan == "default" else dict(mesh=axes,
                                                        constraints=megatron(name, axes))
    example = kwargs if kwargs else args
    pm = autopar.compile(model, autopar.Cluster.local(len(axes) and
                                                      __import__("math").prod(axes.values())),
                         example_inputs=example, simulate=True, **opts)
    check_training(pm, ref, args, kwargs)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_plain_function_matches_one_device(mesh):
    torch.manual_seed(0)
    x, w1, w2 = torch.randn(8, 12), torch.randn(12, 16), torch.randn(16, 4)
    axes = MESHES[mesh]
    n = 1
    for v in axes.values():
        n *= v
    ws = [w.clone().requires_grad_() for w in (w1, w2)]
    pm = autopar.compile(fn, autopar.Cluster.local(n), example_inputs=(x, *ws), simulate=True,
                         mesh=axes)
    ref_ws = [w.clone().requires_grad_() for w in (w1, w2)]
    out, want = pm(x, *ws), fn(x, *ref_ws)
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-6)
    probe = torch.randn(out.shape)
    (out * probe).sum().backward()
    (want * probe).sum().backward()
    for a, b in zip(ws, ref_ws):
        assert (a.grad - b.grad).abs().max() <= 1e-5 * b.grad.abs().max()


class Noisy(torch.nn.Module):
    """Dropout, a random draw and a bernoulli mask per sample on values the plan may
    split."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.drop = torch.nn.Dropout(0.3)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = self.drop(torch.relu(self.fc1(x)))
        keep = h.new_empty(h.shape[0], 1).bernoulli_(0.75)   # stochastic depth's draw
        return self.fc2(h * torch.rand_like(h) * keep / 0.75)


NOISY_PINS = {"batch": {"x": "S(0)"}, "features": {"fc1.*": "S(0)", "fc2.weight": "S(1)"}}


@pytest.mark.parametrize("split", list(NOISY_PINS))
@pytest.mark.parametrize("mesh", list(MESHES))
def test_random_draws_on_split_values_are_one_devices(mesh, split):
    """Each rank draws what one device draws for the whole value and keeps its piece: the
    dropped elements and the random factors, hence the output and every gradient, are one
    device's, whether the batch or the features are split."""
    torch.manual_seed(0)
    net, x = Noisy(), torch.randn(8, 16)
    ref = twin(net)
    axes = MESHES[mesh]
    pins = {k: "R" * (len(axes) - 1) + v for k, v in NOISY_PINS[split].items()}
    pm = autopar.compile(net, slow_devices(math.prod(axes.values())), example_inputs=(x,),
                         simulate=True, mesh=axes, constraints=pins)
    assert "dropout_piece" in pm.code and "random_like_piece" in pm.code
    assert split != "batch" or "bernoulli_piece" in pm.code
    torch.manual_seed(1)
    out = pm(x)
    torch.manual_seed(1)
    want = ref(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    probe = torch.randn(out.shape)
    (out * probe).sum().backward()
    (want * probe).sum().backward()
    grads = pm.full_grad_dict()
    for fqn, p in ref.named_parameters():
        torch.testing.assert_close(grads[fqn], p.grad, rtol=1e-5, atol=1e-6, msg=fqn)
    with torch.no_grad():   # the draws mattered: without them the output differs
        assert not torch.allclose(ref.fc2(torch.relu(ref.fc1(x))), want)


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_parameters_stored_sharded_match_one_device(name):
    """ZeRO-3/FSDP: parameters stored split over the data-parallel axis, gathered for use,
    their gradients reduce-scattered back to the shards."""
    model, args, kwargs = make(name)
    ref = twin(model)
    pm = autopar.compile(model, slow_devices(4),
                         example_inputs=kwargs or args, simulate=True, mesh={"dp": 4},
                         constraints={"*weight": "R", **SHARDED_INPUTS[name]},
                         storage={"*weight": "S(0)"})
    assert "gather_shards" in pm.code
    check_training(pm, ref, args, kwargs)


def test_data_parallel_gradient_sums_are_bucketed_and_exact_under_accumulation():
    """Parameters whose every use sums over the data-parallel axis are summed once per
    backward on the whole gradient; two backwards before a step still equal one device."""
    model, args, kwargs = make("gpt")
    ref = twin(model)
    pm = autopar.compile(model, slow_devices(4), example_inputs=args, simulate=True,
                         mesh={"dp": 4}, constraints={"*": "R", **SHARDED_INPUTS["gpt"]})
    synced = pm._program.grad_sync
    assert synced and all(axes == ("dp",) for axes in synced.values())
    assert "gradients summed over dp after backward" in pm.code
    assert not any(f"grad_sum({name}," in pm.code.replace("grad_sum_", "") for name in synced)
    for _ in range(2):
        pm(*args).backward()
        ref(*args).backward()
    grads = pm.full_grad_dict()
    for fqn, p in ref.named_parameters():
        assert (grads[fqn] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-8, fqn
