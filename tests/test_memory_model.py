"""What the memory model takes backward to keep: the inputs each op saves, values several ops
save held once, views sharing their base's storage, and the peak's two points (the forward
pass at its most, late in backward). Measured against real runs in test_distributed.py and
benchmarks/memory_accuracy.py."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import autopar
from autopar import Cluster
from autopar.program.capture import capture
from autopar.passes import ANALYSIS, PassContext, run_passes
from autopar.search.pricing import Facts


def analysed(model, *inputs):
    captured = capture(model, inputs)
    ctx = PassContext(example_inputs=captured.example_inputs, input_names=captured.input_names)
    run_passes(captured.gm, ctx, ANALYSIS)
    return captured.gm


def calls(gm, op):
    return [n for n in gm.graph.nodes if n.meta.get("autopar.op") == op]


class Projections(nn.Module):
    """One normalised value read by three projections, as attention's q, k, v read it."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.register_buffer("cos", torch.randn(8, d))

    def forward(self, x):
        h = F.layer_norm(x, x.shape[-1:])
        q = self.q(h) * self.cos            # cos needs no gradient: q is not kept
        return (q + self.k(h) + self.v(h)).pow(2).mean()


def test_a_value_three_projections_save_is_held_once():
    gm = analysed(Projections(), torch.randn(8, 16))
    kept = Facts().saved
    linears = calls(gm, "linear")
    norm = calls(gm, "layer_norm")[0]
    assert len(linears) == 3 and all(kept.saves(n, 0) for n in linears)
    assert kept.share(norm) == 1 / 3


def test_a_product_keeps_a_factor_only_for_the_other_ones_gradient():
    gm = analysed(Projections(), torch.randn(8, 16))
    kept = Facts().saved
    mul = calls(gm, "mul")[0]
    q, cos = Facts().of(mul)[0]
    assert not kept.saves(mul, 0)      # q: its gradient needs cos only
    assert kept.saves(mul, 1)          # cos: kept for q's gradient
    pow_ = calls(gm, "pow")[0]
    assert kept.saves(pow_, 0)


class Attention(nn.Module):
    """A fused projection split into pieces, each saved by attention; an embedding."""

    def __init__(self, vocab=32, d=16, heads=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.heads = heads

    def forward(self, idx):
        x = self.wte(idx)
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.pow(2).mean()


def test_the_pieces_of_a_split_share_the_storage_they_came_from():
    gm = analysed(Attention(), torch.randint(0, 32, (2, 8)))
    facts = Facts()
    kept = facts.saved
    attn = calls(gm, "scaled_dot_product_attention")[0]
    qkv = calls(gm, "linear")[0]
    pieces = facts.of(attn)[0]
    assert all(kept.root(p) is qkv for p in pieces)
    assert kept.share(pieces[0]) == 1 / 3     # three savers of one storage hold it once


def test_an_embedding_keeps_its_indices_not_its_table():
    gm = analysed(Attention(), torch.randint(0, 32, (2, 8)))
    kept = Facts().saved
    emb = calls(gm, "embedding")[0]
    assert kept.saves(emb, 0) and not kept.saves(emb, 1)


class Wide(nn.Module):
    def __init__(self, d=1024, layers=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + torch.relu(layer(x))
        return x.pow(2).mean()


def test_the_peak_is_the_larger_of_the_forward_pass_and_late_backward():
    """Data parallel with replicated parameters and a small batch: the gradients summed in
    buckets at the end of backward outweigh the activations, and set the peak."""
    with torch.device("meta"):
        model = Wide()
    x = torch.empty(16, 1024, device="meta")
    p = autopar.plan(model, Cluster.preset("dgx-a100"), example_inputs=(x,), mesh={"dp": 8},
                     constraints={"*": "R", "x": "S(0)"})
    c = p.cost
    static = c.parameter_bytes + c.gradient_bytes + c.optimizer_bytes
    assert c.bucket_bytes >= c.gradient_bytes        # every gradient is summed over dp
    assert c.activation_bytes < c.bucket_bytes
    # (and what the caller holds to the end of the step: its batch, whole, and the 4-byte
    # loss it gets back)
    assert c.memory_bytes_per_device == static + c.bucket_bytes + x.numel() * 4 + 4
    assert "gradient-sum buckets" in p.explain()
    sharded = autopar.plan(model, Cluster.preset("dgx-a100"), example_inputs=(x,),
                           mesh={"dp": 8}, constraints={"*weight": "R", "x": "S(0)"},
                           storage={"*weight": "S(0)"})
    assert sharded.cost.bucket_bytes < c.bucket_bytes  # sharded weights are reduce-scattered


class LogitsAndLoss(nn.Module):
    """A language-model head that returns its logits beside the loss, as transformers do."""

    def __init__(self, d=64, vocab=512):
        super().__init__()
        self.body, self.head = nn.Linear(d, d), nn.Linear(d, vocab)

    def forward(self, x, targets):
        logits = self.head(torch.tanh(self.body(x)))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), logits


def test_outputs_the_caller_gets_back_are_held_whole_to_the_end_of_the_step():
    """What a step returns comes back whole on every rank and is held through backward (the
    caller holds it; pm.step combines every micro-batch's): its bytes count at every point
    from where it is made, late backward included, whatever the split, over the micro-batches
    together."""
    x, targets = torch.randn(16, 32, 64), torch.randint(0, 512, (16, 32))
    logits_bytes = 16 * 32 * 512 * 4
    cluster = Cluster.preset("dgx-a100", nodes=1)
    for m in (1, 2):
        p = autopar.plan(LogitsAndLoss(), cluster, example_inputs=(x, targets),
                         mesh={"dp": 8}, micro_batches=m)
        c = p.cost
        static = c.parameter_bytes + c.gradient_bytes + c.optimizer_bytes
        assert p.micro_batches == m
        assert c.transient_bytes >= logits_bytes      # held whole, on every rank
        assert c.memory_bytes_per_device >= static + c.activation_bytes + logits_bytes
