"""The public entry points: compile, plan, examine."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from dataclasses import dataclass, field

import torch

from .cost.cluster import Cluster
from .cost.model import Training
from .errors import CaptureError, InputError, PlanError
from .program.capture import capture, normalize_example_inputs
from .program.graph import fetch_attr, paused_gc
from .program.repeats import Unrepeatable, containers, cut_to_two, repeated_lists
from .runtime.faults import planning


def _context(captured, cluster, mesh=None, constraints=None, memory_budget_bytes=None,
             level="full", precision="fp32", optimizer="adamw", fold=True, recompute=None,
             micro_batches=None, storage=None):
    from autopar.passes import PassContext
    return PassContext(cluster=cluster, mesh_request=mesh, constraints=dict(constraints or {}),
                       storage=dict(storage or {}),
                       memory_budget_bytes=memory_budget_bytes, level=level, fold=fold,
                       precision=precision, optimizer=optimizer, recompute_request=recompute,
                       micro_batches_request=micro_batches,
                       example_inputs=captured.example_inputs, input_names=captured.input_names,
                       param_fqns=captured.param_fqns)


def _check_cluster(cluster):
    if not isinstance(cluster, Cluster):
        raise PlanError(f"cluster must be an autopar.Cluster, got {type(cluster).__name__}; "
                        "use Cluster.preset('dgx-a100'), Cluster.local(4) or Cluster.load(path)")


def _passes(program: bool) -> list:
    """The passes of a plan (with ``program``, of the rank program too): the analysis, the
    split into micro-batches right after ``simplify_graph`` (sizes are constants from then
    on, and the blocks are folded at the micro-batch's shapes), then planning."""
    from autopar.passes import ANALYSIS, PIPELINE, assign_layouts, simplify_graph

    from .search.microbatch import split_micro_batches
    passes = list(PIPELINE if program else ANALYSIS + [assign_layouts])
    passes.insert(passes.index(simplify_graph) + 1, split_micro_batches)
    return passes


def _plan(model, cluster, example_inputs, mesh, constraints, level, memory_budget_bytes,
          precision, optimizer, fold=True, program=True, recompute=None, micro_batches=None,
          storage=None):
    """Capture and plan ``model``; with ``program`` also generate the rank program (the
    plan alone does not need it). With ``micro_batches`` m > 1 what is planned is the
    program of one micro-batch (``ctx.micro`` says how a step runs it); without, the
    planner picks m where memory binds (:func:`~autopar.search.microbatch.choose_micro_batches`)."""
    from .search.microbatch import batch_size_of, choose_micro_batches
    args = (model, cluster, example_inputs, mesh, constraints, level, memory_budget_bytes,
            precision, optimizer, fold, program, recompute)
    if micro_batches is not None:
        return _plan_at(*args, micro_batches, storage)
    inputs = normalize_example_inputs(example_inputs) if example_inputs is not None else []
    flat = torch.utils._pytree.tree_leaves(inputs)
    return choose_micro_batches(lambda m: _plan_at(*args, m, storage), batch_size_of(flat))


def _plan_at(model, cluster, example_inputs, mesh, constraints, level, memory_budget_bytes,
             precision, optimizer, fold, program, recompute, micro_batches, storage=None):
    """:func:`_plan` for a given micro-batch count."""
    from autopar.passes import run_passes
    passes = _passes(program)
    _check_cluster(cluster)
    if level not in ("fast", "full"):
        raise PlanError(f"level={level!r}: choose 'fast' (propagation) or 'full' (exact)")
    Training(precision, optimizer)  # validates both
    _check_micro_batches(micro_batches)
    options = (cluster, mesh, constraints, memory_budget_bytes, level, precision, optimizer, fold,
               recompute, micro_batches, storage)
    start = time.perf_counter()
    with paused_gc():  # capture, like planning, makes millions of short-lived objects
        repeats = repeated_lists(model) if fold else []
        captured = None
        if repeats:
            try:
                with cut_to_two(containers(model, repeats)):
                    captured = capture(model, example_inputs)
                ctx = _context(captured, *options)
                ctx.repeats = repeats
                ctx.stats["seconds"] = {"capture": time.perf_counter() - start}
                run_passes(captured.gm, ctx, passes)
            except (Unrepeatable, CaptureError):
                captured = None  # traced again below, at full depth
        if captured is None:
            captured = capture(model, example_inputs)
            ctx = _context(captured, *options)
            ctx.stats["seconds"] = {"capture": time.perf_counter() - start}
            run_passes(captured.gm, ctx, passes)
    ctx.stats["repeats"] = {r.path: r.count for r in ctx.repeats}
    ctx.stats["nodes"] = sum(1 for _ in captured.gm.graph.nodes)
    ctx.stats["capture_method"] = captured.method
    ctx.stats["fallback_ops"] = sorted({u[0] for u in ctx.unsupported})
    ctx.stats["seconds"]["total"] = time.perf_counter() - start
    return captured, ctx


def plan_micro_batches(model, cluster, example_inputs, micro_batches: int, *, program=True,
                       mesh=None, constraints=None, level="full", memory_budget_bytes=None,
                       precision="fp32", optimizer="adamw", fold=True, recompute=None,
                       storage=None):
    """Capture ``model`` on ``example_inputs`` (the global batch) and plan it to run as
    ``micro_batches`` micro-batches: the planned program is one micro-batch's.

    Returns ``(captured, ctx)``: ``ctx.plan`` (with ``plan.micro_batches``), with ``program``
    also ``ctx.program``, and ``ctx.micro`` (:class:`autopar.search.microbatch.MicroBatches`, None
    for 1). A search over the micro-batch count prices ``ctx.plan.cost`` per candidate
    (``program=False`` skips code generation) and builds the module of the one it keeps with
    :func:`parallel_module`.
    """
    return _plan(model, cluster, example_inputs, mesh, constraints, level, memory_budget_bytes,
                 precision, optimizer, fold, program=program, recompute=recompute,
                 micro_batches=micro_batches, storage=storage)


def parallel_module(model, captured, ctx, simulate: bool):
    """The ParallelModule of a plan made by :func:`plan_micro_batches` (with ``program``)."""
    from .runtime.module import ParallelModule
    source = _source_tensors(model, captured)
    if any(t.device.type == "meta" for t in source.values()):
        raise PlanError("the model's parameters are on the meta device: autopar.plan() plans "
                        "it, but to run it materialize the parameters first (to_empty + init)")
    return ParallelModule(captured, ctx.plan, ctx.program, source, simulate,
                          micro=getattr(ctx, "micro", None))


def plan(model, cluster, example_inputs=None, *, mesh=None, constraints=None, storage=None,
         level="full", memory_budget_bytes=None, precision="fp32", optimizer="adamw", fold=True,
         recompute=None, micro_batches=None, verbose=False):
    """Plan ``model`` for ``cluster`` without running it; meta-device models are fine.

    >>> import torch, autopar
    >>> p = autopar.plan(torch.nn.Linear(8, 8), autopar.Cluster.local(2),
    ...                  example_inputs=(torch.randn(4, 8),))
    >>> p.mesh
    {'dp': 2}
    """
    with _verbose(verbose):
        _, ctx = _plan(model, cluster, example_inputs, mesh, constraints, level,
                       memory_budget_bytes, precision, optimizer, fold, program=False,
                       recompute=recompute, micro_batches=micro_batches, storage=storage)
    return ctx.plan


def _check_micro_batches(micro_batches):
    if micro_batches is not None and (isinstance(micro_batches, bool) or
                                      not isinstance(micro_batches, int) or micro_batches < 1):
        raise PlanError(f"micro_batches={micro_batches!r}: give a whole number >= 1 (how many "
                        "micro-batches the global batch runs as), or None to let the planner "
                        "choose")


def _source_tensors(model, captured) -> dict:
    out = {}
    if isinstance(model, torch.nn.Module):
        out.update(dict(model.named_parameters(remove_duplicate=False)))
        out.update(dict(model.named_buffers(remove_duplicate=False)))
    gm = captured.gm
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in out:
            out[node.target] = fetch_attr(gm, node.target)
    return out


def _compile_now(model, cluster, example_inputs, simulate, mesh, constraints, level,
                 memory_budget_bytes, precision, optimizer, fold, recompute=None,
                 micro_batches=None, storage=None, verbose=False):
    # distributed: a rank failing here is named by the others, not waited for
    with planning(distributed=not simulate), _verbose(verbose):
        captured, ctx = _plan(model, cluster, example_inputs, mesh, constraints, level,
                              memory_budget_bytes, precision, optimizer, fold,
                              recompute=recompute, micro_batches=micro_batches,
                              storage=storage)
        return parallel_module(model, captured, ctx, simulate)


@contextlib.contextmanager
def _verbose(on: bool):
    """With ``on``, the "autopar" logger at DEBUG (the solver's log among what it shows) and a
    handler printing it to stderr, for the duration."""
    if not on:
        yield
        return
    logger = logging.getLogger("autopar")
    handler = logging.StreamHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.removeHandler(handler)


def compile(model=None, cluster=None, example_inputs=None, *, simulate=False, mesh=None,
            constraints=None, storage=None, level="full", memory_budget_bytes=None,
            precision="fp32", optimizer="adamw", fold=True, recompute=None, micro_batches=None,
            verbose=False):
    """Make ``model`` a distributed program for ``cluster``: a :class:`ParallelModule`.

    ``model`` is an nn.Module instance or a function of tensors. Without ``example_inputs``
    planning waits for the first call and uses its arguments. Used with no model, as
    ``@autopar.compile(cluster=...)``, it decorates an nn.Module subclass (instances become
    parallel modules) or a function.

    simulate: run every rank inside this process instead of one process per rank.
    mesh: axis name -> size (e.g. ``{"dp": 2, "tp": 4}``); by default every factorization
        of the device count into up to three axes is tried.
    constraints: glob over parameter FQNs and input names -> one placement per mesh axis
        (``(Replicate(), Shard(0))`` or ``"RS(0)"``): the layout a parameter is *used* in,
        as DTensor's ColwiseParallel/RowwiseParallel mean it (``Shard(0)`` on a linear
        weight over ``tp`` makes the matmul column-parallel there, ``Shard(1)``
        row-parallel); it is also how the parameter is stored unless ``storage`` says
        otherwise. For an input, the layout each rank receives and reads it in.
    storage: glob over parameter FQNs -> the layout a parameter is *held* in, apart from
        how it is used: ``{"*.weight": "S(0)"}`` on ``dp`` stores every weight split
        (FSDP/ZeRO-3) and gathers it just before use, its gradient reduce-scattered back.
    level: "full" solves the integer program, "fast" propagates greedily.
    memory_budget_bytes: per-device memory the plan must fit (default: the device's).
    precision, optimizer: what a training step holds and computes ("fp32" or
        "bf16-mixed"; "adamw" or "sgd"), for the cost model's memory and time.
    fold: plan every repeated block (a transformer layer) once and give all its instances
        the same layouts; False plans each node on its own.
    recompute: activation recomputation per block: one of "none", "selective", "full" for
        every block, or a dict of globs over block paths to choices (``{"layers.*":
        "full"}``); blocks not named are the planner's choice (see ``plan.recompute``).
    micro_batches: run the global batch (the example inputs) as this many micro-batches
        (splitting dim 0 of the inputs) whose gradients add up before one optimizer step;
        by default the planner picks it where memory binds. ``pm.step(*inputs)`` runs a
        whole step (forward and backward of every micro-batch) and returns the loss;
        ``pm(*inputs)`` computes the full batch's outputs, every micro-batch's activations
        held until ``backward()``. A step that does not split exactly (an op needing a
        batch sum whole on a value that requires grad) is refused with a PlanError.
    verbose: show the solver's log (as the "autopar" logger at DEBUG does); planning is
        otherwise silent.
    """
    opts = dict(simulate=simulate, mesh=mesh, constraints=constraints, storage=storage,
                level=level, memory_budget_bytes=memory_budget_bytes, precision=precision,
                optimizer=optimizer, fold=fold, recompute=recompute,
                micro_batches=micro_batches, verbose=verbose)
    if model is None:
        if cluster is None:
            raise PlanError("autopar.compile needs a cluster: @autopar.compile(cluster=...)")
        return lambda target: _decorate(target, cluster, example_inputs, opts)
    if cluster is None:
        raise PlanError("autopar.compile(model, cluster): cluster is missing; e.g. "
                        "autopar.Cluster.local(4) or autopar.Cluster.preset('dgx-a100')")
    if inspect.isclass(model):
        return _decorate(model, cluster, example_inputs, opts)
    if example_inputs is None:
        return LazyParallel(model, cluster, opts)
    return _compile_now(model, cluster, example_inputs, **opts)


def _decorate(target, cluster, example_inputs, opts):
    if inspect.isclass(target) and issubclass(target, torch.nn.Module):
        @functools.wraps(target, updated=())
        def build(*args, **kwargs):
            instance = target(*args, **kwargs)
            if example_inputs is not None:
                ex = example_inputs() if callable(example_inputs) else example_inputs
                return _compile_now(instance, cluster, ex, **opts)
            return LazyParallel(instance, cluster, opts)
        return build
    if callable(target):
        if example_inputs is not None:
            ex = example_inputs() if callable(example_inputs) else example_inputs
            return _compile_now(target, cluster, ex, **opts)
        lazy = LazyParallel(target, cluster, opts)
        functools.update_wrapper(lazy, target, updated=())
        return lazy
    raise PlanError(f"@autopar.compile decorates an nn.Module subclass or a function, "
                    f"not {type(target).__name__}")


class LazyParallel(torch.nn.Module):
    """Plans at the first call, from that call's arguments. For a function, a call with new
    input shapes plans again; for a module it is an error (its shards hold training state)."""

    def __init__(self, target, cluster, opts):
        super().__init__()
        object.__setattr__(self, "_target", target)
        self._cluster, self._opts = cluster, opts
        self._compiled = {}

    def _key(self, args, kwargs):
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        return tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x)
                     for x in leaves)

    def forward(self, *args, **kwargs):
        return self._module_for(args, kwargs)(*args, **kwargs)

    def step(self, *args, **kwargs):
        """Forward and backward of a whole step (see ``ParallelModule.step``); the first
        call plans, as a first forward does."""
        return self._module_for(args, kwargs).step(*args, **kwargs)

    def _module_for(self, args, kwargs):
        key = self._key(args, kwargs)
        if key not in self._compiled:
            if self._compiled and isinstance(self._target, torch.nn.Module):
                raise InputError("this module was planned for other input shapes; compile "
                                 "again with autopar.compile(model, cluster, example_inputs=...)")
            ex = dict(kwargs) if kwargs and not args else args
            if kwargs and args:
                raise InputError("the first call mixes positional and keyword arguments; "
                                 "pass example_inputs= explicitly")
            pm = _compile_now(self._target, self._cluster, ex, **self._opts)
            self._compiled[key] = pm
            self.add_module(f"compiled_{len(self._compiled)}", pm)
        return self._compiled[key]

    @property
    def parallel_module(self):
        if not self._compiled:
            raise PlanError("not planned yet: call it once on an example batch first")
        return next(reversed(self._compiled.values()))

    def parameters(self, recurse=True):
        if not self._compiled and isinstance(self._target, torch.nn.Module):
            raise PlanError("parameters are sharded at the first call: call the module once "
                            "on an example batch (or pass example_inputs=) before making "
                            "the optimizer")
        return super().parameters(recurse)

    def __getattr__(self, name):
        if name in ("plan", "code", "rank_program", "full_state_dict", "full_grad_dict",
                    "load_full_state_dict"):
            return getattr(self.parallel_module, name)
        return super().__getattr__(name)


@dataclass
class Examination:
    """What autopar found in a program: op counts and the ops with no rule."""

    op_counts: dict
    unsupported: list = field(default_factory=list)  # (op, target, module path, file:line)
    capture_method: str = ""

    @property
    def ok(self) -> bool:
        return not self.unsupported

    def __str__(self) -> str:
        lines = [f"captured with {self.capture_method}: "
                 f"{sum(self.op_counts.values())} ops, {len(self.op_counts)} distinct"]
        if not self.unsupported:
            lines.append("every op has a sharding rule")
        else:
            lines.append(f"{len(self.unsupported)} nodes have no rule and run replicated:")
            for op, target, path, loc in self.unsupported:
                lines.append(f"  {op:24s} {target:40s} {path} {loc}")
        return "\n".join(lines)


def examine(model, example_inputs=None) -> Examination:
    """Capture ``model`` and report every op without a sharding rule, without failing."""
    import warnings

    from autopar.passes import ANALYSIS, run_passes
    captured = capture(model, example_inputs)
    ctx = _context(captured, None, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_passes(captured.gm, ctx, ANALYSIS)
    counts = {}
    for node in captured.gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            op = node.meta["autopar.op"]
            counts[op] = counts.get(op, 0) + 1
    return Examination(counts, list(ctx.unsupported), captured.method)


__all__ = ["compile", "plan", "examine", "Examination", "LazyParallel",
           "normalize_example_inputs", "plan_micro_batches", "parallel_module"]
