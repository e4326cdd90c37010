"""Long sequences: sequence parallelism (Megatron-SP) and context parallelism are in the plan
space. Between the tensor-parallel regions of a Megatron block, norms, dropout and residual
adds run split on the sequence, the all-reduce of a row-parallel output becomes a
reduce-scatter onto the sequence and an all-gather of the sequence feeds the next
column-parallel projection. Attention splits its queries on the sequence, against keys and
values gathered whole, with each rank's rows of one device's causal mask."""

from __future__ import annotations

import collections
import re

import torch
from equivalence import check_training, twin
import pytest
from models import GPT, GPTConfig, Llama, LlamaConfig, tiny_batch
from test_e2e_simulated import megatron, slow_devices

import autopar
from autopar.program.placement import Shard, is_shard

COMMUNICATING = {"all_gather", "gather_shards", "reduce_scatter", "all_reduce", "all_to_all",
                 "strided_gather", "strided_reduce_scatter"}
SEQ = 64


def _sequence_parallel_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, block_size=SEQ))
    batch = tiny_batch(model.cfg, batch=1, seq=SEQ)   # one sequence: only it can be split
    # Megatron's weights; norms and the row-parallel biases held whole, as Megatron holds them
    pins = {**megatron("gpt", {"tp": 4}), "*ln_*": "R", "ln_f.*": "R", "*.c_proj.bias": "R"}
    pm = autopar.compile(model, slow_devices(4), example_inputs=batch, simulate=True,
                         mesh={"tp": 4}, constraints=pins)
    return model, batch, pm


def collectives_by_layer(pm) -> dict:
    """Layer index -> Counter of (collective, tensor dim) in rank 0's program, placed by the
    module of the value each collective moves."""
    out = collections.defaultdict(collections.Counter)
    for node in pm.ranks[0].graph.nodes:
        kind = getattr(node.target, "__name__", "")
        if node.op != "call_function" or kind not in COMMUNICATING:
            continue
        moved = pm.plan.nodes.get(node.args[0].name)
        parts = (moved or {}).get("module", "").split(".")
        if len(parts) > 1 and parts[0] == "h":
            dim = node.args[1] if isinstance(node.args[1], int) else None
            out[int(parts[1])][kind, dim] += 1
    return dict(out)


def test_a_megatron_block_plans_sequence_parallel_with_its_collectives_and_memory():
    model, batch, pm = _sequence_parallel_gpt()
    plan = pm.plan
    # per layer, exactly Megatron-SP's: the sequence gathered before each column-parallel
    # projection (gather_shards: its backward reduce-scatters the gradient back), and each
    # row-parallel output reduce-scattered onto the sequence; no all-reduce inside a layer
    per_layer = collectives_by_layer(pm)
    assert set(per_layer) == {0, 1}
    for layer, found in per_layer.items():
        assert found == {("gather_shards", 1): 2, ("reduce_scatter", 1): 2}, (layer, found)
    # norms, dropout and residual adds run on the split sequence, saving 1/4 of their input
    for name, node in plan.nodes.items():
        if node["module"].startswith("h.") and node["op"] in ("layer_norm", "dropout", "add"):
            assert node["output"] == (Shard(1),), (name, node["output"])
        if node["op"] == "layer_norm" and node["module"].startswith("h."):
            whole = 1 * SEQ * model.cfg.n_embd * 4
            assert node["memory_bytes"] == whole / 4, (name, node["memory_bytes"])
    assert all(not is_shard(p) for p in plan.placements["h.0.ln_1.weight"])
    check_training(pm, twin(model), batch)


def long_llama(seq: int = 256):
    """A LLaMA whose two heads cannot be split four ways, on one long sequence."""
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=32, n_heads=2, n_kv_heads=1, n_layers=2, max_seq_len=seq)
    return Llama(cfg), tiny_batch(cfg, batch=1, seq=seq)


@pytest.mark.parametrize("mesh", [{"cp": 4}, {"cp": 2, "tp": 2}])
def test_a_long_sequence_plans_context_parallel_attention_equal_to_one_device(mesh):
    """The planner splits attention's queries on the sequence (the axis named cp is a label:
    the choice is the planner's), gathers keys and values, and each rank masks its rows as
    one device does; outputs, gradients and parameters after two steps match one device."""
    model, batch = long_llama()
    pm = autopar.compile(model, slow_devices(4), example_inputs=batch, simulate=True,
                         mesh=mesh)
    attention = [n for n in pm.plan.nodes.values() if n["op"] == "scaled_dot_product_attention"]
    assert len(attention) == 2
    for node in attention:
        q, k, v = node["inputs"]
        assert q[0] == Shard(2) and node["output"][0] == Shard(2)   # the queries' rows
        assert not is_shard(k[0]) and not is_shard(v[0])            # whole keys and values
    assert len(re.findall(r"attention_query_rows\(", pm.code)) == 2
    check_training(pm, twin(model), batch, steps=("sgd", "sgd"))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_transformers_llama_at_a_long_sequence_splits_attention_on_the_queries(attention):
    """transformers' LLaMA, through SDPA (a causal call) or its eager path (matmul, mask,
    softmax, matmul): the queries' rows are split over 4 ranks, equal to one device."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=256,
                                   attn_implementation=attention)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (1, 256), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    pm = autopar.compile(model, slow_devices(4), example_inputs=inputs, simulate=True,
                         mesh={"cp": 4})
    ops = {"sdpa": ("scaled_dot_product_attention",), "eager": ("matmul", "softmax")}[attention]
    nodes = [n for n in pm.plan.nodes.values() if n["op"] in ops]
    assert nodes and all(n["inputs"][0] == (Shard(2),) and n["output"] == (Shard(2),)
                         for n in nodes)
    assert pm.plan.stats["fallback_ops"] == []
    check_training(pm, twin(model), (), inputs, steps=("sgd", "sgd"))
