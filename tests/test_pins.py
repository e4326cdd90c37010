"""What a pin means, read off the rank program itself: ``constraints=`` pins the layout a
parameter is used in (DTensor's ColwiseParallel/RowwiseParallel: the split weight goes into
its matmul as it is held, with no gather), ``storage=`` the layout it is held in (FSDP:
stored split, gathered just before use); a pin no rule of the op can honour is refused by
name."""

from __future__ import annotations

import fnmatch

import pytest

import autopar
from autopar import PlanError
from equivalence import check_training, twin
from test_e2e_simulated import MEGATRON, SHARDED_INPUTS, make, megatron

MESH = {"dp": 2, "tp": 2}
COLLECTIVES = ("all_gather", "gather_shards", "all_reduce", "reduce_scatter", "all_to_all")


def _target(n) -> str:
    return getattr(n.target, "__name__", str(n.target))


def _attr(fqn: str) -> str:
    return fqn.replace(".", "_")


def _compile(name, mesh=MESH, **options):
    model, args, kwargs = make(name)
    pm = autopar.compile(model, autopar.Cluster.local(4, measure=False),
                         example_inputs=kwargs or args, simulate=True, mesh=mesh, **options)
    return model, args, kwargs, pm


def _pinned_dims(name, model) -> dict:
    """Parameter FQN -> the dim its Megatron pin splits on tp."""
    out = {}
    for fqn, _ in model.named_parameters():
        dims = [getattr(p, "dim", p) for glob, p in MEGATRON[name].items()
                if fnmatch.fnmatchcase(fqn, glob)]
        if dims:
            out[fqn] = dims[-1]
    return out


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_megatron_pins_make_column_then_row_parallel_matmuls_on_tp(name):
    """Each pinned weight is held split on tp and read by its linear as it is (no collective
    between), a row-parallel linear's partial sums are reduced once over tp, and the batch
    is split on dp; the program still trains as one device."""
    inputs = {k: v + "R" for k, v in SHARDED_INPUTS[name].items()}
    model, args, kwargs, pm = _compile(name, constraints={**megatron(name, MESH), **inputs})
    gm = pm.rank_program(0)
    local = dict(gm.named_parameters())
    pinned = _pinned_dims(name, model)
    full = dict(model.named_parameters())
    for fqn, dim in pinned.items():
        want = list(full[fqn].shape)
        want[dim] //= MESH["tp"]
        assert list(local[_attr(fqn)].shape) == want, f"{fqn} is not held split on dim {dim}"
    attrs = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    readers = {"column": 0, "row": 0}
    for fqn, dim in pinned.items():
        if not fqn.endswith("weight"):
            continue
        node = attrs[_attr(fqn)]
        users = [u for u in node.users if u.op == "call_function"]
        assert users and all(_target(u) == "linear" for u in users), \
            f"{fqn} reaches {[_target(u) for u in users]}, not its linear directly"
        readers["row" if dim == 1 else "column"] += len(users)
    reduced = [n for n in gm.graph.nodes if _target(n) in ("all_reduce", "reduce_scatter")
               and "tp" in n.args]
    assert readers["column"] and readers["row"]
    assert len(reduced) == readers["row"], \
        f"{len(reduced)} reductions over tp for {readers['row']} row-parallel linears"
    assert not [n for n in gm.graph.nodes if _target(n) in ("all_gather", "gather_shards")
                and n.args[0].op == "get_attr"], "a pinned weight is gathered"
    shards = [n for n in gm.graph.nodes if _target(n) == "shard" and n.args[0].op ==
              "placeholder"]
    assert shards and all(n.args[1:] == (0, "dp") for n in shards), "the batch is not split"
    check_training(pm, twin(model), args, kwargs)


def test_storage_pins_hold_parameters_split_and_gather_them_for_use():
    """FSDP on dp beside tensor parallel on tp: fc1's weight used column-parallel on tp and
    stored split on dp too is gathered over dp only, right before its matmul; fc2's weight
    pinned by storage alone is held split and used as the planner finds best."""
    model, args, kwargs, pm = _compile(
        "mlp", constraints={"fc1.weight": "RS(0)", "x": "S(0)R"},
        storage={"fc1.weight": "S(1)S(0)", "fc2.weight": "S(0)R"})
    gm = pm.rank_program(0)
    local = dict(gm.named_parameters())
    full = dict(model.named_parameters())
    rows, cols = full["fc1.weight"].shape
    assert tuple(local["fc1_weight"].shape) == (rows // 2, cols // 2)
    assert local["fc2_weight"].shape[0] == full["fc2.weight"].shape[0] // 2
    w1 = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "fc1_weight")
    (gather,) = w1.users
    assert _target(gather) in ("all_gather", "gather_shards") and gather.args[1:] == (1, "dp")
    (linear,) = gather.users
    assert _target(linear) == "linear"
    assert pm.plan.placements["fc1.weight"] == autopar.parse_layout("S(1)S(0)")
    assert [u.layout for u in pm.plan.uses["fc1.weight"]] == [autopar.parse_layout("RS(0)")]
    assert "stored split, gathered for use" in pm.plan.role("fc1.weight")
    check_training(pm, twin(model), args, kwargs)


def test_a_pin_the_op_cannot_read_names_parameter_op_layout_and_what_it_allows():
    model, args, _ = make("gpt")
    with pytest.raises(PlanError) as e:
        autopar.plan(model, autopar.Cluster.local(2, measure=False), example_inputs=args,
                     mesh={"dp": 2}, constraints={"wte.weight": "S(0)"})
    msg = str(e.value)
    for part in ("wte.weight", "S(0)", "embedding", "can read it only as R, S(1)", "storage="):
        assert part in msg, msg


def test_a_pipeline_axis_on_a_model_without_layers_says_so():
    model, args, _ = make("mlp")
    with pytest.raises(PlanError, match="no repeated layers to cut between"):
        autopar.plan(model, autopar.Cluster.local(4, measure=False), example_inputs=args,
                     mesh={"pp": 2, "dp": 2})


def test_explain_says_what_each_parameter_and_axis_does_in_words():
    inputs = {k: v + "R" for k, v in SHARDED_INPUTS["llama"].items()}
    _, _, _, pm = _compile("llama", constraints={**megatron("llama", MESH), **inputs})
    plan = pm.plan
    text = plan.explain()
    assert plan.role("layers.0.attention.wq.weight") == "dp: replicated; tp: column-parallel"
    assert plan.role("layers.0.attention.wo.weight") == "dp: replicated; tp: row-parallel"
    assert "column-parallel" in text and "row-parallel" in text
    assert plan.pinned["layers.1.feed_forward.w2.weight"] == "use"
    assert plan.pinned["tokens"] == "use" and "norm.weight" not in plan.pinned
    summary = "\n".join(plan.axis_summary())
    assert "dp (2): data parallel" in summary
    assert "tp (2): tensor parallel: 10 column-parallel, 4 row-parallel parameters" in summary
    again = autopar.Plan.from_json(plan.to_json())
    assert again.uses == plan.uses and again.pinned == plan.pinned
    assert again.explain() == text


def test_explain_says_when_an_axis_splits_nothing_and_when_it_shards_storage():
    R, S0 = autopar.Replicate(), autopar.Shard(0)
    plan = autopar.Plan(mesh={"dp": 2}, placements={"w": (R,)}, inputs={"x": (R,)},
                        nodes={"mm": {"op": "linear", "inputs": [(R,), (R,)], "output": (R,)}},
                        uses={"w": [autopar.search.result.Use("linear", (R,), (R,), 2)]})
    assert "dp (2): nothing split" in "\n".join(plan.axis_summary())
    model, args, _ = make("mlp")
    plan = autopar.plan(model, autopar.Cluster.local(2, measure=False), example_inputs=args,
                        mesh={"dp": 2}, constraints={"*": "R", "x": "S(0)"},
                        storage={"*weight": "S(0)"})
    assert plan.placements["fc1.weight"] == (S0,)
    summary = "\n".join(plan.axis_summary())
    assert "sharded parameters (FSDP/ZeRO-3): 2 stored split, gathered for use" in summary
    assert "data parallel" in summary


def test_a_replicated_bias_pinned_beside_a_row_parallel_weight_is_added_once():
    """Megatron's row-parallel linear keeps its bias replicated: the bias is added on one
    rank of tp (read as a partial sum, no collective), so the sum over tp counts it once."""
    model, args, kwargs, pm = _compile(
        "mlp", mesh={"tp": 4},
        constraints={"fc1.*": "S(0)", "fc2.weight": "S(1)", "fc2.bias": "R", "x": "R"})
    assert pm.plan.pinned["fc2.bias"] == "use"
    assert [format_use(u) for u in pm.plan.uses["fc2.bias"]] == ["P"]
    assert pm.plan.role("fc2.weight") == "tp: row-parallel"
    check_training(pm, twin(model), args, kwargs)


def format_use(use) -> str:
    return autopar.format_layout(use.layout)
