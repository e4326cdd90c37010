"""fold_repeated_blocks: blocks found from the module hierarchy of fx and Dynamo graphs, from
repeated op runs of plain functions, and never folded when their structure differs."""

from __future__ import annotations

import json
import logging
import time
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autopar
from autopar import Cluster, format_layout
from autopar.api import _context
from autopar.options import Options
from autopar.program.capture import capture
from autopar.program.graph import module_path
from autopar.passes import ANALYSIS, fold_repeated_blocks, run_passes
from autopar.passes.fold_repeated_blocks import block_prefix
from models import GPT, Bert, BertConfig, GPTConfig, Llama, LlamaConfig, tiny_batch

log = logging.getLogger(__name__)


def analyze(model, example_inputs, constraints=None):
    captured = capture(model, example_inputs)
    ctx = _context(captured, None, Options(constraints=constraints or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_passes(captured.gm, ctx, ANALYSIS)
    return captured, ctx


def bert_inputs(cfg, batch=2, seq=8):
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    return (ids, torch.ones(batch, seq, dtype=torch.long),
            torch.zeros(batch, seq, dtype=torch.long), torch.randint(0, cfg.n_labels, (batch,)))


def assert_layers_are_the_instances(captured, ctx, prefix, n):
    """One class whose i-th instance is exactly the call and get_attr nodes of ``prefix.i``."""
    assert len(ctx.blocks) == 1
    (cls,) = ctx.blocks
    assert [inst.path for inst in cls.instances] == [f"{prefix}.{i}" for i in range(n)]
    nodes = list(captured.gm.graph.nodes)
    for i, inst in enumerate(cls.instances):
        expected = [nd for nd in nodes if nd.op in ("call_function", "call_method", "get_attr")
                    and (module_path(nd) + ".").startswith(f"{prefix}.{i}.")]
        assert inst.nodes == expected
        assert all(nd.meta["autopar.block"] == (0, i) for nd in inst.nodes)
    in_blocks = {nd for inst in cls.instances for nd in inst.nodes}
    assert all("autopar.block" not in nd.meta for nd in nodes if nd not in in_blocks)
    # the layers form a chain: each reads what the one before exposes
    for a, b in zip(cls.instances, cls.instances[1:]):
        assert set(a.outputs) & set(b.inputs)
    assert ctx.stats["block_classes"]["instances"] == [n]
    return cls


def test_gpt_layers_traced_by_fx_form_one_class():
    model = GPT(GPTConfig(n_layer=4))
    captured, ctx = analyze(model, tiny_batch(model.cfg))
    assert captured.method == "symbolic_trace"
    cls = assert_layers_are_the_instances(captured, ctx, "h", 4)
    assert ctx.stats["block_classes"]["method"] == "module_hierarchy"
    # params of the block are inside it; only the residual stream crosses its boundary
    assert all(nd.op != "get_attr" for inst in cls.instances for nd in inst.inputs)
    assert [len(inst.outputs) for inst in cls.instances] == [1, 1, 1, 1]


def test_llama_layers_traced_by_dynamo_form_one_class():
    model = Llama(LlamaConfig(n_layers=4))
    captured, ctx = analyze(model, tiny_batch(model.cfg))
    assert captured.method == "dynamo"   # Dynamo hoists every get_attr to the top of the graph
    cls = assert_layers_are_the_instances(captured, ctx, "layers", 4)
    # the rotary tables are read by every layer
    names = [{nd.name for nd in inst.inputs} for inst in cls.instances]
    assert all({"cos", "sin"} <= s for s in names)


def test_bert_layers_form_one_class():
    cfg = BertConfig(n_layers=4)
    captured, ctx = analyze(Bert(cfg), bert_inputs(cfg))
    assert_layers_are_the_instances(captured, ctx, "layers", 4)


class Residual(nn.Module):
    def __init__(self, dim, hidden, swap=False, scale=1.0):
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.swap, self.scale = swap, scale

    def forward(self, x):
        y = self.down(F.relu(self.up(x))) * self.scale
        return y - x if self.swap else x - y


class Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def classes_of(ctx) -> list:
    return [[inst.path for inst in c.instances] for c in ctx.blocks]


def test_a_layer_of_another_width_is_not_folded_with_the_others():
    model = Stack([Residual(16, 32), Residual(16, 32), Residual(16, 64), Residual(16, 32)])
    captured, ctx = analyze(model, (torch.randn(4, 16),))
    assert classes_of(ctx) == [["layers.0", "layers.1", "layers.3"], ["layers.2"]]
    assert ctx.stats["block_classes"]["instances"] == [3, 1]
    odd = ctx.blocks[1].instances[0]
    assert all(nd.meta["autopar.block"] == (1, 0) for nd in odd.nodes)
    assert ctx.blocks[0].key != ctx.blocks[1].key


def test_blocks_that_differ_in_operand_order_or_a_constant_are_not_folded():
    model = Stack([Residual(16, 32), Residual(16, 32, swap=True), Residual(16, 32, scale=0.5),
                   Residual(16, 32)])
    _, ctx = analyze(model, (torch.randn(4, 16),))
    assert classes_of(ctx) == [["layers.0", "layers.3"], ["layers.1"], ["layers.2"]]
    assert len({c.key for c in ctx.blocks}) == 3   # the WL hash already tells them apart


def test_a_layer_pinned_by_a_constraint_is_not_folded_with_the_others():
    model = Stack([Residual(16, 32) for _ in range(4)])
    _, ctx = analyze(model, (torch.randn(4, 16),), constraints={"layers.1.up.weight": "R"})
    assert classes_of(ctx) == [["layers.0", "layers.2", "layers.3"], ["layers.1"]]


@pytest.mark.parametrize("path, prefix", [
    ("h.0.attn.c_attn", "h.0"), ("layers.12.feed_forward.w1", "layers.12"),
    ("L['self'].layers[3].attention", "layers.3"), ("L['self'].h._modules['2'].mlp", "h.2"),
    ("getattr(L['self'].layers, '7').wq", "layers.7"),
    ("encoder.layer.1.blocks.0", "encoder.layer.1"), ("ln_f", ""), ("", "")])
def test_block_prefix_reads_fx_and_dynamo_spellings(path, prefix):
    assert block_prefix(path) == prefix


def looped(x, w):
    x = x * 2.0
    for _ in range(4):          # six ops, four times, each iteration reading the last
        x = torch.tanh(x @ w).mul(0.5).add(x).relu()
        x = x.sigmoid()
    return x.sum()


def test_a_plain_function_loop_folds_into_runs():
    captured, ctx = analyze(looped, (torch.randn(4, 8), torch.randn(8, 8)))
    assert ctx.stats["block_classes"]["method"] == "repeated_runs"
    (cls,) = ctx.blocks
    assert len(cls.instances) == 4
    for i, inst in enumerate(cls.instances):
        ops = [nd.meta["autopar.op"] for nd in inst.nodes]
        assert ops == ["matmul", "tanh", "mul", "add", "relu", "sigmoid"]
        assert all(nd.meta["autopar.block"] == (0, i) for nd in inst.nodes)
        assert "w" in {nd.name for nd in inst.inputs}
    for a, b in zip(cls.instances, cls.instances[1:]):
        assert a.outputs == [a.nodes[-1]] and a.nodes[-1] in b.inputs


def growing(x):
    for _ in range(4):          # the same ops, but the shape doubles every time
        x = torch.cat([x, x], dim=-1).relu().sin()
    return x


def test_repeated_ops_on_changing_shapes_are_not_folded():
    _, ctx = analyze(growing, (torch.randn(2, 3),))
    assert ctx.blocks == [] and ctx.stats["block_classes"]["method"] == "none"


class Shared(nn.Module):
    """One layer applied four times (ALBERT-style): no numbered modules to name blocks."""

    def __init__(self):
        super().__init__()
        self.layer = Residual(16, 32)

    def forward(self, x):
        for _ in range(4):
            x = self.layer(x)
        return x


def test_a_shared_layer_applied_repeatedly_folds_into_runs():
    _, ctx = analyze(Shared(), (torch.randn(4, 16),))
    (cls,) = ctx.blocks
    assert len(cls.instances) == 4 and ctx.stats["block_classes"]["method"] == "repeated_runs"
    # its parameters are read by every run, so they are inputs of each, not part of one
    for inst in cls.instances:
        assert {nd.target for nd in inst.inputs if nd.op == "get_attr"} == {
            "layer.up.weight", "layer.up.bias", "layer.down.weight", "layer.down.bias"}


def test_plan_reports_block_classes():
    model = GPT(GPTConfig(n_layer=4))
    tokens, _ = tiny_batch(model.cfg)
    plan = autopar.plan(model, Cluster.local(2, measure=False), example_inputs=(tokens,),
                        level="fast")
    summary = plan.stats["block_classes"]
    assert summary["classes"] == 1 and summary["instances"] == [4]
    assert summary["nodes_per_block"][0] > 0
    assert "fold_repeated_blocks" in plan.stats["seconds"]
    assert json.loads(plan.to_json())["stats"]["block_classes"] == summary


def test_fold_time_on_an_eight_layer_llama_is_logged(record_property):
    with torch.device("meta"):
        model = Llama(LlamaConfig(n_layers=8, dim=512, hidden_dim=1536, n_heads=8,
                                  n_kv_heads=4, max_seq_len=64))
    tokens = torch.zeros(2, 64, dtype=torch.long, device="meta")
    captured, ctx = analyze(model, (tokens,))
    start = time.perf_counter()
    fold_repeated_blocks(captured.gm, ctx)
    seconds = time.perf_counter() - start
    log.info("fold_repeated_blocks on an 8-layer Llama (%d nodes): %.4f s",
             len(captured.gm.graph.nodes), seconds)
    record_property("fold_seconds", seconds)
    assert ctx.stats["block_classes"]["instances"] == [8]


@pytest.mark.parametrize("depth", [4, 6])
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_folded_and_unfolded_plans_reach_the_same_optimum(family, depth):
    """Planning the first and last layers and one standing for those between gives the
    exact program's unfolded optimum here, with a program that does not grow with depth."""
    from models import GPT, GPTConfig, Llama, LlamaConfig, tiny_batch
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=depth)) if family == "gpt" else \
        Llama(LlamaConfig(n_layers=depth))
    cluster = autopar.Cluster.preset("dgx-a100", devices_per_node=2)
    example = tiny_batch(model.cfg)
    folded = autopar.plan(model, cluster, example_inputs=example, fold=True)
    unfolded = autopar.plan(model, cluster, example_inputs=example, fold=False)
    for mesh, m in folded.stats["meshes"].items():
        full = unfolded.stats["meshes"][mesh]["problem_nodes"]
        assert m["problem_nodes"] < full, mesh
    assert folded.cost.total_s == pytest.approx(unfolded.cost.total_s, rel=1e-9)


def test_the_folded_program_does_not_grow_with_depth():
    from models import Llama, LlamaConfig, tiny_batch
    cluster = autopar.Cluster.preset("dgx-a100", devices_per_node=2)
    sizes = {}
    for depth in (4, 9):
        model = Llama(LlamaConfig(n_layers=depth))
        plan = autopar.plan(model, cluster, example_inputs=tiny_batch(model.cfg), level="fast")
        sizes[depth] = {k: m["problem_nodes"] for k, m in plan.stats["meshes"].items()}
    assert sizes[4] == sizes[9]


# -- folded capture: two layers traced, the others copied --------------------------------------

def _ops(gm) -> tuple:
    """The program as calls in order and parameters read (where get_attr nodes sit in the
    graph does not matter)."""
    def shape(n):
        return tuple(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor) else None
    calls = [(n.op, n.meta.get("autopar.op"), module_path(n), shape(n),
              tuple(a.target if a.op == "get_attr" else a.meta.get("autopar.op")
                    for a in n.all_input_nodes))
             for n in gm.graph.nodes if n.op not in ("get_attr", "placeholder", "output")]
    attrs = sorted((n.target, shape(n)) for n in gm.graph.nodes if n.op == "get_attr")
    return calls, attrs


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_folded_capture_traces_two_layers_and_copies_the_rest(family):
    """fx (GPT) and Dynamo (LLaMA): the program built from two traced layers is the program
    traced at full depth, node for node, and runs the same."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=5)) if family == "gpt" else Llama(LlamaConfig(n_layers=5))
    example = tiny_batch(model.cfg)
    cluster = autopar.Cluster.local(2)
    folded = autopar.compile(model, cluster, example_inputs=example, simulate=True)
    full = autopar.compile(model, cluster, example_inputs=example, simulate=True, fold=False)
    assert folded.plan.stats["repeats"] == {"h" if family == "gpt" else "layers": 5}
    assert full.plan.stats["repeats"] == {}
    assert _ops(folded._captured.gm) == _ops(full._captured.gm)
    assert folded.plan.stats["block_classes"]["instances"] == [5]
    torch.testing.assert_close(folded(*example), model(*example), rtol=1e-5, atol=0)


class _Alternating(nn.Module):
    """Layers alike in parameters whose forward branches on the layer's index."""

    def __init__(self, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return x + (torch.relu(y) if self.layer_idx % 2 else torch.tanh(y))


class _Stack(nn.Module):
    def __init__(self, layer, n=4, keep_all=False):
        super().__init__()
        self.layers = nn.ModuleList(layer(i) for i in range(n))
        self.keep_all = keep_all

    def forward(self, x):
        seen = []
        for layer in self.layers:
            x = layer(x)
            seen.append(x)
        return torch.stack(seen).sum(0) if self.keep_all else x


class _Plain(nn.Module):
    def __init__(self, layer_idx):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


@pytest.mark.parametrize("model", [_Stack(_Alternating), _Stack(_Plain, keep_all=True)],
                         ids=["branches-on-layer-index", "reads-every-layer"])
def test_folded_capture_falls_back_to_full_depth_where_layers_cannot_be_copied(model):
    x = torch.randn(4, 8)
    pm = autopar.compile(model, autopar.Cluster.local(2), example_inputs=(x,), simulate=True)
    assert pm.plan.stats["repeats"] == {}
    torch.testing.assert_close(pm(x), model(x), rtol=1e-5, atol=1e-6)


def _unfolded_cost(captured, ctx):
    """The cost of the chosen plan priced on the unfolded problem (every node on its own)."""
    from autopar.cost.model import CostModel
    from autopar.search.problem import build_problem
    model = CostModel(ctx.cluster, ctx.mesh, ctx.options.training())
    prob = build_problem(captured.gm, ctx.mesh, model, {})
    choice = {n: prob.options[n].index(n.meta["autopar.strategy"]) for n in prob.nodes}
    return prob.evaluate(choice)


def test_a_tight_budget_mixes_strategies_across_the_instances_of_a_block():
    """Under a memory budget that every-layer-alike plans meet only by splitting every
    middle layer's weights the slow way, the planner gives some layers one layout and the
    rest another (as OSDP mixes sharded and replicated layers): faster, within budget when
    priced layer by layer."""
    from autopar.api import _plan
    from autopar.search import meshes as planner
    from test_solver import batch, meta_net
    net, cluster, x = meta_net(2048, 8192, layers=10), Cluster.preset("dgx-a100", nodes=2), \
        batch(4096, 2048)
    free = autopar.plan(net, cluster, example_inputs=x, mesh={"dp": 16})
    budget = 0.65 * free.cost.memory_bytes_per_device
    options = (cluster, x,
               Options(mesh={"dp": 16}, memory_budget_bytes=budget, recompute="none"))
    captured, ctx = _plan(net, *options)
    mixed = ctx.plan
    mixes, planner.MAX_MIXES = planner.MAX_MIXES, 0
    try:
        alike = _plan(net, *options)[1].plan
    finally:
        planner.MAX_MIXES = mixes
    assert next(iter(mixed.stats["meshes"].values()))["folding"][0] == "mixed"
    assert mixed.cost.total_s < alike.cost.total_s
    middle = {format_layout(mixed.placements[f"layers.{i}.0.weight"]) for i in range(1, 9)}
    assert len(middle) == 2
    priced = _unfolded_cost(captured, ctx)
    assert priced.total_s == pytest.approx(mixed.cost.total_s, rel=1e-9)
    assert priced.memory_bytes_per_device <= budget
    # where memory binds the plan still depends on nothing but the inputs
    again = _plan(net, *options)[1].plan
    assert again.placements == mixed.placements and again.cost == mixed.cost


def test_refinements_where_memory_binds_are_solved_over_the_tied_relaxations_strategies():
    """Where memory binds, the program with the ends apart is solved over the strategies the
    tied program's relaxation used at the node standing for each of its nodes: its plan uses
    only those, beats or ties the tied plan (which is among them), and prices as it says;
    where no plan uses only the hinted strategies, its own relaxation is solved after all."""
    from autopar.api import _plan
    from autopar.cost.model import CostModel, Training
    from autopar.program.mesh import Mesh
    from autopar.search.problem import build_problem
    from autopar.search.solver import solve
    from test_solver import batch, meta_net
    net, cluster, x = meta_net(2048, 8192, layers=10), Cluster.preset("dgx-a100", nodes=2), \
        batch(4096, 2048)
    free = autopar.plan(net, cluster, example_inputs=x, mesh={"dp": 16})
    budget = 0.65 * free.cost.memory_bytes_per_device
    captured, ctx = _plan(net, cluster, x, Options(mesh={"dp": 16}, memory_budget_bytes=budget))
    mesh = Mesh(("dp",), (16,))
    model = CostModel(cluster, mesh, Training("fp32", "adamw"))
    tied = build_problem(captured.gm, mesh, model, {}, ctx.blocks, "tied")
    first = solve(tied, budget)
    assert any(len(s) > 1 for s in first.support.values()), "memory does not bind"

    def hint(n):
        return first.support.get(tied.rep.get(n, n))

    ends = build_problem(captured.gm, mesh, model, {}, ctx.blocks, "ends")
    hinted = solve(ends, budget, hint=hint)
    for n, i in hinted.choice.items():
        assert hint(n) is None or ends.options[n][i] in hint(n), n.name
    assert hinted.objective <= first.objective * (1 + 1e-9)
    cost = ends.evaluate(hinted.choice)
    assert cost.total_s == pytest.approx(hinted.objective, rel=1e-9)
    assert cost.memory_bytes_per_device <= budget * (1 + 1e-9)

    def heaviest(n):   # every node its strategy storing the most: nothing fits
        return {max(ends.options[n], key=lambda s: ends.static_bytes[n][
            ends.options[n].index(s)])}

    fallback = solve(ends, budget, hint=heaviest)
    assert fallback.objective == pytest.approx(solve(ends, budget).objective, rel=1e-9)
