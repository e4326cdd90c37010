"""autopar.apply: a plan taken into the user's own module with DTensor's module styles and
FSDP2, for a training loop of one's own.

The mapping from plan to styles, and every plan it refuses, are checked without processes;
one world of 4 gloo processes trains the zoo's GPT and LLaMA and a transformers LLaMA,
applied, against one device (tests/dtensor_cases.py)."""

from __future__ import annotations

import copy
import dataclasses
import functools
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

import autopar
import dtensor_cases
from autopar import PlanError, Replicate, Shard, StridedShard
from autopar.runtime import dtensor
from autopar.runtime.dtensor import ModuleStyle, local_inputs, module_styles
from autopar.search.result import Use
from equivalence import RTOL
from spawn import run_world

R, S0, S1, LOCAL = Replicate(), Shard(0), Shard(1), Shard(-1)
COLUMN_LOCAL, ROW_LOCAL = ModuleStyle("colwise", R, LOCAL), ModuleStyle("rowwise", LOCAL, R)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plan_of():
    """Case of dtensor_cases -> its plan, each planned once."""
    return functools.cache(dtensor_cases.plan_case)


def model_of(case):
    return dtensor_cases.make_model(dtensor_cases.CASES[case][0])[0]


def test_apply_is_autopars_own():
    assert autopar.apply is dtensor.apply and "apply" in autopar.__all__


def test_megatron_llama_runs_its_heads_split_with_the_head_counts_divided(plan_of):
    """Query, key, value, gate and up projections column-parallel with their outputs kept
    split (local), output and down projections row-parallel; the attention views this
    rank's heads: n_heads 4 -> 2, n_kv_heads 2 -> 1. Data parallel on dp, nothing stored
    split there."""
    styles = module_styles(model_of("llama-megatron"), plan_of("llama-megatron"))
    assert (styles.tensor_axis, styles.data_axis) == ("tp", "dp")
    want = {}
    for i in range(2):
        block = f"layers.{i}"
        want.update({f"{block}.attention.w{x}": COLUMN_LOCAL for x in "qkv"})
        want[f"{block}.attention.wo"] = ROW_LOCAL
        want.update({f"{block}.feed_forward.w{x}": COLUMN_LOCAL for x in "13"})
        want[f"{block}.feed_forward.w2"] = ROW_LOCAL
    assert styles.modules == want
    assert styles.heads == {f"layers.{i}.attention": {"n_heads": 2, "n_kv_heads": 1}
                            for i in range(2)}
    assert styles.shard_groups == {"layers.0": False, "layers.1": False, "": False}
    assert styles.unmapped == () and styles.tied == ()


def test_module_styles_are_dtensors_own_styles(plan_of):
    styles = module_styles(model_of("llama-megatron"), plan_of("llama-megatron"))
    column = styles.modules["layers.0.attention.wq"].parallel_style()
    row = styles.modules["layers.0.attention.wo"].parallel_style()
    assert isinstance(column, ColwiseParallel) and isinstance(row, RowwiseParallel)
    assert column.input_layouts == (R,) and column.output_layouts == (LOCAL,)
    assert row.input_layouts == (LOCAL,) and row.output_layouts == (R,)
    assert "layers.0.attention.wq: ColwiseParallel(input R, output S(-1))" in styles.explain()


def test_gpt_fused_projection_the_plan_gathers_is_gathered_and_its_tied_weight_tied(plan_of):
    """GPT cuts its fused query, key and value output at a fixed width: the plan gathers
    the plainly split projection before the cut, so the style does and the attention runs
    whole (no head count changes); its MLP keeps its hidden features split. The embedding
    and the head share one weight split on the embedding dim: both styles hold it S(1),
    tied again after each takes its own."""
    styles = module_styles(model_of("gpt-megatron"), plan_of("gpt-megatron"))
    assert styles.modules["h.0.attn.c_attn"] == ModuleStyle("colwise", R, R)
    assert styles.modules["h.0.attn.c_proj"] == ModuleStyle("rowwise", R, R)
    assert styles.modules["h.1.mlp.c_fc"] == COLUMN_LOCAL
    assert styles.modules["h.1.mlp.c_proj"] == ROW_LOCAL
    assert styles.modules["wte"] == ModuleStyle("colwise", R, R)
    assert styles.modules["lm_head"] == ModuleStyle("rowwise", R, R)
    assert styles.tied == (("wte.weight", "lm_head.weight"),)
    assert styles.heads == {}


def test_parameters_stored_split_over_dp_reshard_their_groups_after_forward(plan_of):
    """Storage pins S(0)R on the second block's norms and the embedding, S(1)S(0) on its
    gate projection: that block and the root reshard after forward (FSDP), the gate
    projection split over dp on its input features; the first block keeps its parameters
    gathered from forward to backward (data parallel)."""
    plan = plan_of("llama-megatron-fsdp")
    assert plan.placements["layers.1.ffn_norm.weight"] == (S0, R)
    styles = module_styles(model_of("llama-megatron-fsdp"), plan)
    assert styles.shard_groups == {"layers.0": False, "layers.1": True, "": True}
    assert styles.shard_dims == {"layers.1.feed_forward.w1.weight": 1}
    assert "  layers.1: reshard_after_forward=True" in styles.explain()


def test_transformers_llama_maps_by_its_own_module_names_and_reports_split_norms(plan_of):
    """Dynamo names ops by ``L['args'][0].model...`` and by the functions a module calls;
    both find their modules. The attention views with -1 heads: no count changes. The plan
    runs the norms sequence-split and carries partial sums through the residual adds: the
    styles run those whole, and say so."""
    model = model_of("hf-llama-megatron")
    styles = module_styles(model, plan_of("hf-llama-megatron"))
    attention = "model.layers.1.self_attn"
    assert styles.modules[f"{attention}.q_proj"] == COLUMN_LOCAL
    assert styles.modules[f"{attention}.o_proj"] == ROW_LOCAL
    assert styles.modules["model.layers.0.mlp.up_proj"] == COLUMN_LOCAL
    assert styles.heads == {}
    assert any("post_attention_layernorm" in line for line in styles.unmapped)
    assert not any("self_attn" in line or "apply_rotary" in line for line in styles.unmapped)
    assert "ops the plan splits outside column/row-parallel pairs" in styles.unmapped_note()


def _raises(model, plan, *fragments):
    with pytest.raises(PlanError) as e:
        module_styles(model, plan)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)
    return str(e.value)


def test_a_strided_split_is_refused_with_the_plain_split_to_pin(plan_of):
    plan = plan_of("llama-megatron")
    strided = (R, StridedShard(0, (1, 1, 1)))
    fqn = "layers.0.attention.wq.weight"
    plan = dataclasses.replace(
        plan, placements={**plan.placements, fqn: strided},
        uses={**plan.uses, fqn: [u._replace(layout=strided) for u in plan.uses[fqn]]})
    _raises(model_of("llama-megatron"), plan, fqn, "RS(0)*3", "pin a plain split",
            "autopar.compile")


def test_pipeline_stages_are_refused(plan_of):
    plan = plan_of("llama-megatron")
    plan = dataclasses.replace(plan, mesh={"pp": 2, **plan.mesh}, stages=[{}, {}])
    _raises(model_of("llama-megatron"), plan, "2 pipeline stages", "autopar.compile")


def test_a_parameter_no_module_style_splits_is_refused_with_every_other_problem(plan_of):
    """A norm's weight used split on tp, and a weight stored whole where its style stores
    it split: both named, in one error."""
    plan = plan_of("llama-megatron")
    norm, wq = "norm.weight", "layers.0.attention.wq.weight"
    plan = dataclasses.replace(
        plan, uses={**plan.uses, norm: [Use("mul", (R, S0), (S0, Shard(2)), 1)]},
        placements={**plan.placements, wq: (R, R)})
    _raises(model_of("llama-megatron"), plan, "parameter norm.weight: used RS(0)",
            "no DTensor module style holds a RMSNorm's weight", f"parameter {wq}: stored RR "
            "but used RS(0)")


def test_ops_split_where_no_parameter_or_input_is_are_refused(plan_of):
    """Inputs whole on dp while the plan's ops split the batch there: the styles would run
    every op whole on both dp ranks (context parallel is the same kind of split)."""
    plan = plan_of("llama-megatron")
    plan = dataclasses.replace(plan, inputs={name: (R, R) for name in plan.inputs})
    message = _raises(model_of("llama-megatron"), plan, "op h (embedding in tok_embeddings): "
                      "S(0)R, split on dim 0 over dp, where no parameter or input is split")
    assert "more ops like these" in message


def test_an_input_split_on_the_tensor_axis_is_refused(plan_of):
    plan = plan_of("llama-megatron")
    plan = dataclasses.replace(plan, inputs={**plan.inputs, "tokens": (S0, S1)})
    _raises(model_of("llama-megatron"), plan, "input tokens: S(0)S(1) splits it on dim 1 "
            "over tp")


def test_head_counts_that_do_not_split_are_refused(plan_of):
    model = copy.deepcopy(model_of("llama-megatron"))
    model.layers[0].attention.n_kv_heads = 3
    _raises(model, plan_of("llama-megatron"), "layers.0.attention.n_kv_heads = 3 heads do "
            "not split over tp of 2")


def test_a_plan_of_another_model_is_refused(plan_of):
    _raises(torch.nn.Linear(4, 4), plan_of("llama-megatron"), "weight, bias are not in the "
            "plan", "the plan holds tok_embeddings.weight")


def test_a_device_mesh_unlike_the_plans_is_refused_before_the_model_changes(plan_of):
    model = model_of("llama-megatron")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    mesh = SimpleNamespace(mesh_dim_names=("tp", "dp"), shape=(2, 2), ndim=2)
    with pytest.raises(PlanError, match=r"device_mesh \{'tp': 2, 'dp': 2\} does not match "
                                        r"the plan's mesh \{'dp': 2, 'tp': 2\}"):
        autopar.apply(model, plan_of("llama-megatron"), mesh)
    with pytest.raises(PlanError, match="the plan is for 4 devices .* the process group has 1"):
        autopar.apply(model, plan_of("llama-megatron"))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert type(model.layers[0].attention.wq) is torch.nn.Linear


def test_local_inputs_cut_the_batch_on_the_data_axis_only(plan_of):
    plan = plan_of("llama-megatron")
    tokens, targets = torch.arange(8).view(4, 2), torch.arange(8, 16).view(4, 2)
    mesh = SimpleNamespace(get_local_rank=lambda axis: {"dp": 1, "tp": 0}[axis])
    got = local_inputs(plan, {"tokens": tokens, "targets": targets, "other": 3}, mesh)
    assert torch.equal(got["tokens"], tokens[2:]) and torch.equal(got["targets"], targets[2:])
    assert got["other"] == 3


@pytest.mark.processes
def test_applied_models_train_as_one_device_on_4_gloo_processes(plan_of, tmp_path_factory):
    """GPT, LLaMA and a transformers LLaMA on dp=2 x tp=2 (and LLaMA with parameters
    stored split over dp): three steps, SGD then AdamW, of an ordinary loop over each
    rank's half of the batch equal one device's in loss, every gradient and every
    parameter, on every rank. FSDP holds each parameter the plan stores split over dp split
    on the plan's dim. Only the transformers LLaMA's plan splits ops the styles run whole
    (its norms), and apply says so."""
    plans = {case: plan_of(case).to_json() for case in dtensor_cases.CASES}
    results = run_world(functools.partial(dtensor_cases.main, plans), 4, tmp_path_factory,
                        "apply4")
    for rank, res in enumerate(results):
        assert set(res) == set(dtensor_cases.CASES)
        for case, r in res.items():
            assert "error" not in r, f"rank {rank} {case}: {r.get('error')}\n{r.get('trace')}"
            assert r["worst"] <= RTOL, f"rank {rank} {case}: worst relative error {r['worst']}"
            assert r["warned"] == case.startswith("hf-"), (rank, case)
            assert r["stored_as_planned"], (rank, case)
