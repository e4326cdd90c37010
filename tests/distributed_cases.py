"""Cases run for real by tests/test_distributed.py: one process per rank, gloo on CPU.

Each process runs every case in order (collectives need every rank in step), trains the
parallel module and a single-device twin for three steps, and reports the worst relative
error, or the error raised, per case.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "examples")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import autopar  # noqa: E402
from autopar.runtime.memory import measure_step  # noqa: E402
from equivalence import check_steps, check_training, twin, uneven_targets  # noqa: E402
from spawn import join_world  # noqa: E402
from test_e2e_simulated import SHARDED_INPUTS, make, megatron, slow_devices  # noqa: E402

STEPS = ("sgd", "adamw", "adamw")


def training_cases(world):
    """On 2 ranks every kind of plan; on 4 those whose groups differ there (two axes, four
    heads split, four shards) and those on two axes below."""
    meshes = {f"{world}": {"tp": world}} if world == 2 else {"2x2": {"dp": 2, "tp": 2}}
    for name in ("gpt", "llama"):
        for mesh_id, axes in meshes.items():
            if world == 2:   # the planner's own plans on two axes: in simulation (e2e tests)
                yield f"{name}-default-{mesh_id}", name, dict(mesh=axes)
            yield f"{name}-megatron-{mesh_id}", name, dict(mesh=axes,
                                                         constraints=megatron(name, axes))
        if world == 4 and name == "llama":
            yield f"{name}-megatron-4", name, dict(mesh={"tp": 4},
                                                   constraints=megatron(name, {"tp": 4}))
        if name != "gpt":
            continue
        # data parallel: gradient sums bucketed after backward
        if world == 2:
            yield f"{name}-dataparallel-{world}", name, dict(
                mesh={"dp": world}, cluster=slow_devices(world), expect="summed over dp",
                constraints={"*": "R", **SHARDED_INPUTS[name]})
        # parameters stored sharded, gathered for use, gradients reduce-scattered back
        yield f"{name}-sharded-{world}", name, dict(
            mesh={"dp": world}, cluster=slow_devices(world), expect="gather_shards",
            constraints={"*weight": "R", **SHARDED_INPUTS[name]}, storage={"*weight": "S(0)"})
    # micro-batches: pm.step runs 2 per step, unevenly ignored tokens, one all-reduce per
    # gradient bucket per step; on 4 ranks data parallel over 2 with Megatron over 2
    micro_mesh = {"dp": 2} if world == 2 else {"dp": 2, "tp": 2}
    for name in ("gpt", "llama"):
        held = megatron(name, micro_mesh) if "tp" in micro_mesh else {"*": "R"}
        inputs = {k: v + "R" * (len(micro_mesh) - 1) for k, v in SHARDED_INPUTS[name].items()}
        yield f"{name}-microbatch-2-{world}", name, dict(
            mesh=micro_mesh, cluster=slow_devices(world), micro_batches=2, use_step=True,
            constraints={**held, **inputs})
    # activation recomputation: every block under torch.utils.checkpoint, its collectives
    # run again in backward (full) or kept (selective); on 4 ranks with micro-batches below
    if world == 2:
        yield f"gpt-recompute-full-{world}", "gpt", dict(
            mesh={"tp": world}, cluster=slow_devices(world), recompute="full",
            expect="autopar_runtime_checkpoint_h_1(")
        yield f"llama-recompute-selective-{world}", "llama", dict(
            mesh={"tp": world}, cluster=slow_devices(world), recompute="selective",
            expect="autopar_runtime_checkpoint_layers_1(")
    # both: recomputed blocks in each of 2 micro-batches, one gradient all-reduce per bucket
    for name, choice, block in (("gpt", "full", "h_1"), ("llama", "selective", "layers_1")):
        held = megatron(name, micro_mesh) if "tp" in micro_mesh else {"*": "R"}
        inputs = {k: v + "R" * (len(micro_mesh) - 1) for k, v in SHARDED_INPUTS[name].items()}
        yield f"{name}-recompute-{choice}-microbatch-2-{world}", name, dict(
            mesh=micro_mesh, cluster=slow_devices(world), micro_batches=2, use_step=True,
            recompute=choice, constraints={**held, **inputs},
            expect=f"autopar_runtime_checkpoint_{block}(")
    if world == 4:
        # context parallel: queries split on one long sequence, keys and values gathered
        yield "llama-context-parallel-4", "llama-long", dict(
            mesh={"cp": 4}, cluster=slow_devices(4), steps=("sgd", "sgd"),
            expect="attention_query_rows(")
    if world == 2:
        # a transformers model (Dynamo capture, keyword inputs, ModelOutput), Megatron-style
        yield "hf-llama-megatron-2", "hf-llama", dict(
            mesh={"tp": 2}, cluster=slow_devices(2), steps=("sgd", "sgd"),
            constraints=hf_megatron("llama", {"tp": 2}))
        # expert parallel: each rank computes its own experts' rows (rank-aware local op)
        # where calls cost, and sends rows to their experts and back where bytes do
        yield "hf-mixtral-experts-2", "hf-mixtral", dict(
            mesh={"tp": 2}, cluster=hf_links(2, "SLOW_CALLS"), steps=("sgd", "sgd"),
            expect="grouped_mm_local_experts", constraints={"*.experts.*": "S(0)"})
        # a transformers decoder in 2 micro-batches, sequences padded: each micro-batch
        # reads its rows of the attention mask built once for the whole batch
        yield "hf-qwen2-padded-microbatch-2", "hf-qwen2-padded", dict(
            mesh={"dp": 2}, cluster=slow_devices(2), micro_batches=2, use_step=True,
            adamw=dict(lr=1e-3, eps=1e-3), constraints={
                "*": "R", "input_ids": "S(0)", "attention_mask": "S(0)", "labels": "S(0)"})
        # LLaMA, Qwen2 and Mistral in 4 or 2 micro-batches, the layouts the planner's
        for family, counts in (("llama", (4,)), ("qwen2", (4,)), ("mistral", (2,))):
            for m in counts:
                yield f"hf-{family}-padded-microbatch-{m}", f"hf-{family}-padded", dict(
                    mesh={"dp": 2}, cluster=slow_devices(2), micro_batches=m, use_step=True,
                    adamw=dict(lr=1e-3, eps=1e-3), sums_gradients=None)
    if world == 2:
        # BatchNorm with the batch split: statistics of the whole batch, and running
        # statistics and counters on every rank as one device's; eval() reads them
        for name in ("bn1d", "bn2d", "bn3d", "bn2d-eval"):
            yield f"{name}-dataparallel-2", name, dict(
                mesh={"dp": 2}, cluster=slow_devices(2),
                constraints={"x": "S(0)", "target": "S(0)"},
                expect=None if name.endswith("eval") else "write_buffer(")
    if world == 2:
        # convolutions split on image rows: each rank takes its neighbour's halo rows
        yield "convnet-rows-2", "convnet", dict(
            mesh={"sp": 2}, cluster=slow_devices(2), constraints={"x": "S(2)"},
            expect="halo_rows(")
    if world in (2, 4):
        for family in ("mixtral",):   # Qwen3-MoE's dispatch: in simulation (test_hf)
            yield f"hf-{family}-dispatch-{world}", f"hf-{family}", dict(
                mesh={"ep": world}, cluster=hf_links(world, "NARROW"), steps=("sgd", "sgd"),
                expect="expert_dispatch(", constraints={"*.experts.*": "S(0)"})


def pipeline_cases(world):
    """Pipelines under torchrun: stages on their own ranks, values handed in parts between
    them, uneven splits, each schedule; 4 and 8 processes."""
    if world == 4:
        yield "gpt-pipeline-pp2xdp2-1f1b", "gpt-deep", dict(
            mesh={"pp": 2, "dp": 2}, stages=(1, 3), schedule="1f1b", micro_batches=2)
        yield "llama-pipeline-pp2xtp2-gpipe", "llama-deep", dict(
            mesh={"pp": 2, "tp": 2}, stages=(3, 1), schedule="gpipe", micro_batches=4,
            constraints=megatron("llama", {"tp": 2}))
        yield "llama-pipeline-pp4-1f1b", "llama-deep", dict(
            mesh={"pp": 4}, stages=(1, 1, 1, 1), schedule="1f1b", micro_batches=4)
        yield "gpt-pipeline-pp2xdp2-interleaved", "gpt-deep", dict(
            mesh={"pp": 2, "dp": 2}, stages=(1, 1, 1, 1), schedule="interleaved-1f1b",
            micro_batches=2)
    if world == 8:
        yield "gpt-pipeline-pp2xdp2xtp2-1f1b", "gpt-deep", dict(
            mesh={"pp": 2, "dp": 2, "tp": 2}, stages=(3, 1), schedule="1f1b", micro_batches=2,
            constraints=megatron("gpt", {"dp": 2, "tp": 2}))


def run_pipeline(name, opts):
    """Three AdamW steps of ``pm.step`` against one device (loss, every gradient, every
    parameter, on every rank)."""
    model, args, _ = make_model(name)
    ref = twin(model)
    m = opts.get("micro_batches") or 1
    args = (args[0], uneven_targets(args[1], m))
    pm = autopar.compile(model, autopar.Cluster.local(measure=False), example_inputs=args,
                         **opts)
    assert not pm.simulate and pm.plan.stages
    assert "stage" in pm.code
    worst, _ = check_steps(pm, ref, [args] * 3)
    return worst


def hf_links(n, kind):
    import test_hf  # imports transformers: only where a case needs it
    return test_hf.links(n, *getattr(test_hf, kind))


def hf_megatron(name, mesh):
    import test_hf  # imports transformers: only where a case needs it
    return test_hf.megatron(name, mesh)


def make_model(name):
    """(model, args, kwargs): the zoo of test_e2e_simulated, or test_hf's for "hf-*"; "-deep":
    4 layers and a batch of 8."""
    if name.endswith("-deep"):
        from models import GPT, GPTConfig, Llama, LlamaConfig, tiny_batch
        torch.manual_seed(0)
        if name == "gpt-deep":
            cfg = GPTConfig(n_layer=4)
            return GPT(cfg), tiny_batch(cfg, batch=8), {}
        cfg = LlamaConfig(n_layers=4)
        return Llama(cfg), tiny_batch(cfg, batch=8), {}
    if name.startswith("bn"):
        import test_batchnorm
        dims = int(name[2])
        model, args = test_batchnorm.make_bn(dims)
        if name.endswith("-eval"):
            with torch.no_grad():
                for batch in test_batchnorm.batches(dims):
                    model(*batch)
            model.eval()
        return model, args, {}
    if name == "convnet":
        import test_spatial
        model, args = test_spatial.make_conv_net()
        return model, args, {}
    if name == "llama-long":
        import test_long_sequences
        model, batch = test_long_sequences.long_llama(seq=64)
        return model, batch, {}
    if name.startswith("hf-"):
        import test_hf
        family, padded = name[3:].removesuffix("-padded"), name.endswith("-padded")
        if family == "mistral":
            torch.manual_seed(0)
            model, kwargs = test_hf.mistral()
        else:
            model, kwargs = test_hf.make(family)
        return model, (), test_hf.padded(kwargs) if padded else kwargs
    return make(name)


def run_training(name, opts):
    model, args, kwargs = make_model(name)
    ref = twin(model)
    opts = dict(opts)
    cluster = opts.pop("cluster", None) or autopar.Cluster.local()
    expect = opts.pop("expect", None)
    steps = opts.pop("steps", STEPS)
    use_step = opts.pop("use_step", False)
    adamw = opts.pop("adamw", None)
    sums = opts.pop("sums_gradients", True)   # None: as the plan has it
    if use_step and args:  # targets ignored unevenly over the micro-batches
        args = (args[0], uneven_targets(args[1], opts.get("micro_batches") or 1))
    pm = autopar.compile(model, cluster, example_inputs=kwargs or args, **opts)
    assert expect is None or expect in pm.code, f"{expect} missing from the rank program"
    assert not pm.simulate
    if not use_step:
        return check_training(pm, ref, args, kwargs, steps=steps)
    return run_steps(pm, ref, args, kwargs, len(steps), adamw, sums)


def run_steps(pm, ref, args, kwargs, count, adamw=None, sums=True):
    """Train with ``pm.step``; each step all-reduces each gradient bucket once (a bucket
    per set of axes: these models' gradients fit one; with ``sums``, there is one)."""
    worst, launches = check_steps(pm, ref, [args] * count, kwargs, adamw)
    buckets = len(set(pm._program.grad_sync.values()))
    assert (buckets or not sums) and launches == [buckets] * count, \
        f"gradient all-reduces per step {launches}, expected {buckets} each"
    return worst


MEMORY_PLANS = {
    "dp-full-recompute": dict(mesh_of=lambda w: {"dp": w}, constraints={"*": "R"},
                              recompute="full"),
    "sharded-selective-2": dict(mesh_of=lambda w: {"dp": w}, constraints={"*weight": "R"},
                                storage={"*weight": "S(0)"}, recompute="selective",
                                micro_batches=2),
    "megatron": dict(mesh_of=lambda w: {"tp": w}, megatron=True),
    "automatic": dict(mesh_of=lambda w: None),
}


class Branches(torch.nn.Module):
    """Parallel projections of one activation as repeated single-layer blocks (as gate and
    up projections are separate modules), summed."""

    def __init__(self, dim: int = 256, hidden: int = 512, n: int = 4):
        super().__init__()
        self.inp = torch.nn.Linear(dim, dim, bias=False)
        self.branches = torch.nn.ModuleList(torch.nn.Linear(dim, hidden, bias=False)
                                            for _ in range(n))
        self.out = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x, y):
        x = self.inp(x)
        h = sum(torch.nn.functional.gelu(b(x)) for b in self.branches)
        return ((self.out(h) - y) ** 2).mean()


def memory_cases(world):
    """(case, model name, compile options) whose memory is measured against the plan: every
    kind of plan for GPT on 2 ranks, for LLaMA and parallel branches on 4."""
    for name in (("gpt",) if world == 2 else ("llama",)):
        for plan, o in MEMORY_PLANS.items():
            mesh = o["mesh_of"](world)
            opts = {k: v for k, v in o.items() if k not in ("mesh_of", "megatron")}
            if mesh is not None:
                opts["mesh"] = mesh
            if o.get("megatron"):
                opts["constraints"] = megatron(name, mesh)
            elif "constraints" in opts:
                opts["constraints"] = {**opts["constraints"], **SHARDED_INPUTS[name]}
            yield f"memory-{name}-{plan}-{world}", name, opts
    if world == 2:
        return
    # single-layer blocks that read one input, each recomputed in full: it is kept once
    yield f"memory-branches-dp-full-recompute-{world}", "branches", dict(
        mesh={"dp": world}, constraints={"*weight": "R", "x": "S(0)", "y": "S(0)"},
        recompute="full")


def memory_model(name):
    """Models wide enough that activations, not a step's few small tensors, fill memory."""
    import torch
    from models import GPT, GPTConfig, Llama, LlamaConfig, tiny_batch
    torch.manual_seed(0)
    if name == "branches":
        return Branches(), (torch.randn(512, 256), torch.randn(512, 256))
    if name == "gpt":
        cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=128)
        return GPT(cfg), tiny_batch(cfg, 8, 64)
    cfg = LlamaConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                      hidden_dim=384, max_seq_len=64)
    return Llama(cfg), tiny_batch(cfg, 8, 64)


def run_memory(name, opts):
    """Measured bytes of a step on this rank beside the plan's prediction: the relative
    error of the saved activations and of the peak."""
    import torch
    model, batch = memory_model(name)
    pm = autopar.compile(model, autopar.Cluster.local(measure=False), example_inputs=batch,
                         **opts)
    optimizer = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    for _ in range(2):
        pm.step(*batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    # the least of three steps: gloo's thread lets go of a collective's buffers at moments
    # that vary from run to run, and a buffer not yet let go reads as held
    runs = [measure_step(pm, optimizer, *batch) for _ in range(3)]
    got = min(runs, key=lambda r: r.saved)
    got = type(got)(got.held, got.saved, min(r.peak for r in runs))
    c = pm.plan.cost
    return {"saved": (c.saved_bytes - got.saved) / got.saved,
            "peak": (c.memory_bytes_per_device - got.peak) / got.peak,
            "held": (c.parameter_bytes + c.gradient_bytes + c.optimizer_bytes - got.held)
            / got.held}


def run_loss_peak(world):
    """A language model whose step peaks where backward enters its loss (a large
    vocabulary): the budget is what its fastest plan needs when that point is ignored (and
    the gradients in flight in backward).
    The plan made for that budget, and the fastest plan (the one a model blind to the
    point would pick), each run a step: their measured peaks beside the budget."""
    from unittest import mock

    import torch
    import autopar.search.problem as problem
    from models import GPT, GPTConfig, tiny_batch
    cfg = GPTConfig(vocab_size=4096, block_size=64, n_layer=2, n_head=4, n_embd=128)
    batch = tiny_batch(cfg, 16, 64)
    cluster = autopar.Cluster.local(world, measure=False)

    def build():
        torch.manual_seed(0)
        return GPT(cfg)

    # data parallel, so that each rank's logits are a share of the batch's, whole over the
    # vocabulary
    pins = dict(mesh={"dp": world}, constraints={"*": "R", "idx": "S(0)", "targets": "S(0)"})
    options = dict(pins, memory_budget_bytes=1e15)
    # blind to backward: no copies of the loss's gradient, no gradients in flight
    with mock.patch.object(problem, "GRADIENT_COPIES", {}), \
            mock.patch.object(problem, "_gradients_in_flight",
                              lambda prob, n, facts: [0.0] * len(prob.options[n])):
        blind = autopar.plan(build(), cluster, example_inputs=batch, **options)
    budget = blind.cost.memory_bytes_per_device
    fastest = autopar.compile(build(), cluster, example_inputs=batch, **options)
    planned = autopar.compile(build(), cluster, example_inputs=batch, **pins,
                              memory_budget_bytes=budget)
    out = {"budget": budget, "predicted": planned.plan.cost.memory_bytes_per_device,
           "same_as_blind": fastest.plan.placements == blind.placements and
           fastest.plan.micro_batches == blind.micro_batches}
    for name, pm in (("fastest", fastest), ("planned", planned)):
        optimizer = torch.optim.AdamW(pm.parameters(), lr=1e-3)
        for _ in range(2):
            pm.step(*batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        out[name] = measure_step(pm, optimizer, *batch).peak
    return out


def run_errors(world):
    """Misuse in a real run gives a clear error on every rank, never a hang."""
    out = {}
    model, args, _ = make("mlp")
    try:
        autopar.compile(model, autopar.Cluster.local(world * 2), example_inputs=args)
        out["world-size-mismatch"] = "no error"
    except autopar.PlanError as e:
        out["world-size-mismatch"] = f"PlanError: {e}"
    opts = dict(mesh={"tp": world})
    if dist.get_rank() == 0:
        opts["constraints"] = {"fc1.weight": (autopar.Shard(0),)}
    try:
        autopar.compile(model, autopar.Cluster.local(), example_inputs=args, **opts)
        out["plan-mismatch"] = "no error"
    except autopar.PlanError as e:
        out["plan-mismatch"] = f"PlanError: {e}"
    return out


def _reported(fn, *args) -> dict:
    """What ``fn(*args)`` returns, or the error it raised, for the test to report."""
    start = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 - reported to the test
        out = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    return {**out, "seconds": time.perf_counter() - start}


def _pipelines(results, world):
    for case, name, opts in pipeline_cases(world):
        results[case] = _reported(lambda: {"worst": run_pipeline(name, opts)})


def main_pipelines(rank, world, port, result_dir):
    """The pipeline cases alone (the world of 8 processes runs only these)."""
    join_world(rank, world, port, result_dir, timeout_s=240)
    results = {}
    _pipelines(results, world)
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def main(rank, world, port, result_dir):
    join_world(rank, world, port, result_dir, timeout_s=120)
    results = {}
    _pipelines(results, world)
    for case, name, opts in training_cases(world):
        results[case] = _reported(lambda: {"worst": run_training(name, opts)})
    for case, name, opts in memory_cases(world):
        results[case] = _reported(run_memory, name, opts)
    results["loss-peak"] = _reported(run_loss_peak, world)
    results.update({k: {"message": v} for k, v in run_errors(world).items()})
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
