"""The public entry points: compile, plan, examine."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ._torch import tree_leaves
from .cost.cluster import Cluster
from .errors import CaptureError, InputError, NotFaster, PlanError
from .options import Options, schedule_chunks
from .program.capture import capture, normalize_example_inputs
from .program.graph import copy_graph_module, fetch_attr, paused_gc, tensor_names
from .program.repeats import Unrepeatable, containers, cut_to_two, repeated_lists
from .runtime.faults import planning
from .search.microbatch import batch_size_of


def _context(captured, cluster, options: Options):
    from autopar.passes import PassContext
    return PassContext(cluster=cluster, options=options,
                       example_inputs=captured.example_inputs, input_names=captured.input_names,
                       param_fqns=captured.param_fqns)


def _check_cluster(cluster):
    if not isinstance(cluster, Cluster):
        raise PlanError(f"cluster must be an autopar.Cluster, got {type(cluster).__name__}; "
                        "use Cluster.preset('dgx-a100'), Cluster.local(4) or Cluster.load(path)")


def _plan(model, cluster, example_inputs, options: Options, program: bool = True):
    """Capture and plan ``model``; with ``program`` also generate the rank program of the
    plan kept (the plan alone does not need it). The model is captured and prepared once;
    each micro-batch count the search tries (:func:`autopar.search.choose`) plans a copy of
    it split into that count's micro-batches (``ctx.micro`` says how a step runs it).
    Returns ``(captured, ctx)`` of the count kept, ``ctx.stats["seconds"]`` covering the
    whole call."""
    from autopar import search
    from autopar.passes import generate_rank_program, run_passes
    _check_cluster(cluster)
    start = time.perf_counter()
    with paused_gc():  # capture, like planning, makes millions of short-lived objects
        prepared = _Prepared(model, example_inputs, cluster, options)
        inputs = normalize_example_inputs(example_inputs) if example_inputs is not None else []
        flat = tree_leaves(inputs)
        batch = batch_size_of(flat)
        kept = search.choose(prepared.plan_at, batch, options, cluster=cluster,
                             staged=None if options.mesh is not None or not options.fold
                             else lambda p, bound, flat: prepared.staged(p, batch, bound,
                                                                         flat),
                             layers=_layer_count)
        if program:
            for st in getattr(kept.ctx, "stages", None) or ():
                run_passes(st.graph.gm, st.ctx, [generate_rank_program])
            if not getattr(kept.ctx, "stages", None):
                run_passes(kept.captured.gm, kept.ctx, [generate_rank_program])
    captured, ctx = kept
    ctx.stats["repeats"] = {r.path: r.count for r in ctx.repeats}
    ctx.stats["nodes"] = sum(1 for _ in captured.gm.graph.nodes)
    ctx.stats["capture_method"] = captured.method
    ctx.stats["captures"] = prepared.captures
    ctx.stats["micro_batch_counts_tried"] = prepared.counts
    if prepared.floors:
        ctx.stats["pipeline_floor_s"] = dict(prepared.floors)
    ctx.stats["fallback_ops"] = sorted({u[0] for u in ctx.unsupported})
    ctx.stats["aliases"] = _aliases(model)
    ctx.stats["seconds"]["total"] = time.perf_counter() - start
    return captured, ctx


def _pipeline_floor(flat, cluster, stages: int, batch_size, options) -> float | None:
    """The least step time of any pipeline of ``stages`` that the search would plan
    (:func:`autopar.search.stages.pipeline_floor` at the most micro-batches it tries), the
    work priced on the program of ``flat``, the plan of one stage (None without one). None
    where the bound does not hold: a schedule of several chunks per group, or ``flat`` run
    in more micro-batches than a pipeline may be (ops on whole parameters, such as casts,
    run once per micro-batch). ``options``: the user's, as the pipeline is planned with."""
    from .cost.model import Training, work_floor_s
    from .search.microbatch import pipeline_counts
    from .search.stages import pipeline_floor
    if flat is None:
        return None
    if options.schedule is not None and schedule_chunks(options.schedule)[1] > 1:
        return None
    counts = [options.micro_batches] if options.micro_batches is not None else \
        pipeline_counts(batch_size, stages)
    if flat.plan.micro_batches > min(counts):
        return None
    ops = []
    for n in flat.captured.gm.graph.nodes:
        strategy = n.meta.get("autopar.strategy")
        if n.op in ("call_function", "call_method") and strategy is not None and \
                strategy.spec is not None:
            ops.append((n.meta["autopar.op"], strategy.spec.flops, strategy.spec.num_bytes))
    training = Training(options.precision, options.optimizer, flat.plan.micro_batches)
    work, dispatch = work_floor_s(ops, cluster, training)
    return pipeline_floor(work, cluster.world_size, stages, max(counts), dispatch)


def _layer_count(found) -> int:
    """The layers of the program ``found`` (a :class:`_Programmed`) planned: the most
    pipeline stages it may be cut into."""
    from .program.stages import count_layers
    return count_layers(found.captured.gm, getattr(found.ctx, "blocks", []))


class _Programmed(NamedTuple):
    """A micro-batch count's program and its pass context, holding its plan."""

    captured: object
    ctx: object

    @property
    def plan(self):
        return self.ctx.plan


class _Prepared:
    """A model captured once (repeated layers cut to two where they fold) and prepared by
    the passes that do not depend on the micro-batch count; :meth:`plan_at` plans a copy of
    it for one count. Where the layers cut to two do not expand back (they differ), the
    model is captured again at full depth, once."""

    def __init__(self, model, example_inputs, cluster, options: Options):
        self.model, self.example_inputs = model, example_inputs
        self.cluster, self.options = cluster, options
        self.seconds = {}      # shared by every count's context: the whole call's time
        self.captures, self.counts = 0, []
        self.floors = {}       # stage count -> the least step a pipeline of it can take
        start = time.perf_counter()
        repeats = repeated_lists(model) if options.fold else []
        self.seconds["capture"] = time.perf_counter() - start
        try:
            self._capture(repeats)
        except CaptureError:
            if not repeats:
                raise
            self._capture([])  # traced again, at full depth

    def _capture(self, repeats):
        from autopar.passes import PREPARE, run_passes
        start = time.perf_counter()
        if repeats:
            with cut_to_two(containers(self.model, repeats)):
                captured = capture(self.model, self.example_inputs)
        else:
            captured = capture(self.model, self.example_inputs)
        self.captures += 1
        self.seconds["capture"] = self.seconds.get("capture", 0.0) + \
            time.perf_counter() - start
        ctx = _context(captured, self.cluster, self.options)
        ctx.repeats = repeats
        ctx.stats["seconds"] = self.seconds
        run_passes(captured.gm, ctx, PREPARE)
        self.captured, self.ctx = captured, ctx

    def plan_at(self, micro_batches: int) -> _Programmed:
        """Plan a copy of the prepared program split into ``micro_batches``: as one program,
        or cut into the pipeline stages the options pin."""
        from autopar.passes import PER_COUNT, assign_layouts, plan_stages
        self.counts.append(micro_batches)
        last = plan_stages if (self.options.pipeline_stages or 1) > 1 else assign_layouts
        try:
            return self._plan_copy(micro_batches, PER_COUNT + [last])
        except Unrepeatable:
            if not self.ctx.repeats:
                raise
            self._capture([])  # traced again, at full depth
            return self._plan_copy(micro_batches, PER_COUNT + [last])

    def staged(self, stages: int, batch_size, bound=None, flat=None) -> _Programmed:
        """The best plan of the prepared program as a pipeline of ``stages`` stages; a
        PlanError where none is predicted faster than ``bound`` seconds a step. Not planned
        at all (NotFaster) where no pipeline of ``stages`` can be, whatever its cuts and
        stage plans: :func:`_pipeline_floor` of ``flat`` (the plan of one stage) not below
        ``bound``."""
        from autopar import search
        floor = _pipeline_floor(flat, self.cluster, stages, batch_size, self.options)
        if floor is not None and bound is not None:
            self.floors[stages] = floor
            if floor >= bound:
                raise NotFaster(f"no pipeline of {stages} stages can step faster than "
                                f"{floor:.4g} s (its bubble with the work spread evenly), "
                                f"not below the best plan's {bound:.4g} s")
        other = copy.copy(self)
        other.options = self.options.replace(mesh={"pp": stages})
        other.stage_bound = bound

        def plan_at(m):   # each count found tightens the bound the next must beat
            found = other.plan_at(m)
            total = found.plan.cost.total_s
            other.stage_bound = total if other.stage_bound is None else \
                min(other.stage_bound, total)
            return found
        return search.choose(plan_at, batch_size, other.options)

    def _plan_copy(self, micro_batches: int, passes) -> _Programmed:
        from autopar.passes import run_passes
        start = time.perf_counter()
        gm = copy_graph_module(self.captured.gm)
        captured = dataclasses.replace(self.captured, gm=gm,
                                       example_inputs=list(self.captured.example_inputs),
                                       input_names=list(self.captured.input_names))
        ctx = dataclasses.replace(self.ctx, options=self.options.replace(
                                      micro_batches=micro_batches),
                                  example_inputs=list(self.ctx.example_inputs),
                                  input_names=list(self.ctx.input_names),
                                  unsupported=list(self.ctx.unsupported),
                                  stats={"seconds": self.seconds})
        self.seconds["copy"] = self.seconds.get("copy", 0.0) + time.perf_counter() - start
        if getattr(self, "stage_bound", None) is not None:
            ctx.stage_bound = self.stage_bound
        run_passes(gm, ctx, passes)
        return _Programmed(captured, ctx)


def plan_micro_batches(model, cluster, example_inputs, micro_batches: int, *, program=True,
                       **options):
    """Capture ``model`` on ``example_inputs`` (the global batch) and plan it to run as
    ``micro_batches`` micro-batches (``options`` as :class:`~autopar.options.Options` takes
    them): the planned program is one micro-batch's.

    Returns ``(captured, ctx)``: ``ctx.plan`` (with ``plan.micro_batches``), with ``program``
    also ``ctx.program``, and ``ctx.micro``
    (:class:`autopar.passes.split_micro_batches.MicroBatches`, None for 1).
    """
    return _plan(model, cluster, example_inputs,
                 Options(**options, micro_batches=micro_batches), program=program)


def parallel_module(model, captured, ctx, simulate: bool):
    """The ParallelModule of a plan made by :func:`plan_micro_batches` (with ``program``)."""
    from .runtime.module import ParallelModule
    from .runtime.pipeline import PipelineModule
    source = _source_tensors(model, captured)
    if any(t.device.type == "meta" for t in source.values()):
        raise PlanError("the model's parameters are on the meta device: autopar.plan() plans "
                        "it, but to run it materialize the parameters first (to_empty + init)")
    if getattr(ctx, "stages", None):
        return PipelineModule(captured, ctx.plan, ctx.stages, source, simulate,
                              micro=getattr(ctx, "micro", None))
    return ParallelModule(captured, ctx.plan, ctx.program, source, simulate,
                          micro=getattr(ctx, "micro", None))


def plan(model, cluster, example_inputs=None, *, mesh=None, constraints=None, storage=None,
         level="full", memory_budget_bytes=None, precision="fp32", optimizer="adamw", fold=True,
         recompute=None, micro_batches=None, schedule=None, stages=None, verbose=False):
    """Plan ``model`` for ``cluster`` without running it; meta-device models are fine. The
    options are :func:`compile`'s.

    >>> import torch, autopar
    >>> p = autopar.plan(torch.nn.Linear(8, 8), autopar.Cluster.local(2),
    ...                  example_inputs=(torch.randn(4, 8),))
    >>> p.mesh
    {'dp': 2}
    """
    options = Options(mesh=mesh, constraints=constraints, storage=storage, level=level,
                      memory_budget_bytes=memory_budget_bytes, precision=precision,
                      optimizer=optimizer, fold=fold, recompute=recompute,
                      micro_batches=micro_batches, schedule=schedule, stages=stages,
                      verbose=verbose)
    with _verbose(options.verbose):
        _, ctx = _plan(model, cluster, example_inputs, options, program=False)
    return ctx.plan


def _aliases(model) -> dict:
    """First FQN -> the model's other names for the same tensor (a tied head's weight):
    the plan names a tensor by its first name, as ``named_parameters()`` does."""
    if not isinstance(model, torch.nn.Module):
        return {}
    return {first: names[1:] for first, names in tensor_names(model).items() if len(names) > 1}


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


def _compile_now(model, cluster, example_inputs, simulate: bool, options: Options):
    # distributed: a rank failing here is named by the others, not waited for
    with planning(distributed=not simulate), _verbose(options.verbose):
        captured, ctx = _plan(model, cluster, example_inputs, options)
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
            schedule=None, stages=None, verbose=False):
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
    schedule: with a "pp" mesh axis (pipeline stages, outermost: ``{"pp": 2, "dp": 2}``),
        the pipeline schedule: "gpipe", "1f1b" or "interleaved-1f1b" (``-v<k>``: k chunks
        of layers per rank); by default 1F1B where the micro-batches are at least the stages.
    stages: with a "pp" axis, the layers of each stage in order (``(3, 5)``); by default the
        planner cuts where the step is fastest within each stage's memory.
    verbose: show the solver's log (as the "autopar" logger at DEBUG does); planning is
        otherwise silent.
    """
    if not isinstance(simulate, bool):
        raise PlanError(f"simulate={simulate!r}: pass True (every rank in this process) or "
                        "False (one process per rank)")
    options = Options(mesh=mesh, constraints=constraints, storage=storage, level=level,
                      memory_budget_bytes=memory_budget_bytes, precision=precision,
                      optimizer=optimizer, fold=fold, recompute=recompute,
                      micro_batches=micro_batches, schedule=schedule, stages=stages,
                      verbose=verbose)
    opts = dict(simulate=simulate, options=options)
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
        leaves = tree_leaves((args, kwargs))
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

    def state_dict(self, *args, **kwargs) -> dict:
        """The planned module's sharded state (``ParallelModule.state_dict``)."""
        return self.parallel_module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.parallel_module.load_state_dict(state_dict)

    def __getattr__(self, name):
        if name in ("plan", "code", "rank_program", "full_state_dict", "full_grad_dict",
                    "load_full_state_dict", "optimizer_state_dict",
                    "load_optimizer_state_dict"):
            return getattr(self.parallel_module, name)
        return super().__getattr__(name)


@dataclass
class Examination:
    """What autopar found in a program: op counts, the ops with no rule, and the share of
    the program's FLOPs those hold (what running them replicated costs)."""

    op_counts: dict
    unsupported: list = field(default_factory=list)  # (op, target, module path, file:line)
    capture_method: str = ""
    flops: dict = field(default_factory=dict)        # per op: FLOPs of its nodes, one step
    total_flops: float = 0.0                         # forward FLOPs of the whole program

    @property
    def ok(self) -> bool:
        return not self.unsupported

    @property
    def replicated_flops_share(self) -> float:
        """The share of the program's forward FLOPs in ops without a rule."""
        ops = {u[0] for u in self.unsupported}
        held = sum(f for op, f in self.flops.items() if op in ops)
        return held / self.total_flops if self.total_flops else 0.0

    def __str__(self) -> str:
        lines = [f"captured with {self.capture_method}: "
                 f"{sum(self.op_counts.values())} ops, {len(self.op_counts)} distinct"]
        if not self.unsupported:
            lines.append("every op has a sharding rule")
            return "\n".join(lines)
        lines.append(f"{len(self.unsupported)} nodes have no rule and run replicated, "
                     f"{self.replicated_flops_share:.1%} of the forward FLOPs:")
        for op, target, path, loc in self.unsupported:
            lines.append(f"  {op:24s} {target:40s} {path} {loc}")
        for op in sorted({u[0] for u in self.unsupported}):
            share = self.flops.get(op, 0.0) / self.total_flops if self.total_flops else 0.0
            lines.append(f"  {op}: {share:.1%} of the FLOPs")
        return "\n".join(lines)


def examine(model, example_inputs=None) -> Examination:
    """Capture ``model`` and report every op without a sharding rule, without failing, with
    the share of the forward FLOPs each holds: a rule's count for ops that have one, torch's
    FLOP counter (matmuls, convolutions, attention) or one per output element for the
    others."""
    import warnings

    from autopar.passes import ANALYSIS, run_passes
    from autopar.rules import rule_for, spec_for
    captured = capture(model, example_inputs)
    ctx = _context(captured, None, Options())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_passes(captured.gm, ctx, ANALYSIS)
    counts, flops = {}, {}
    for node in captured.gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            op = node.meta["autopar.op"]
            counts[op] = counts.get(op, 0) + 1
            f = spec_for(node).flops if rule_for(op) is not None else _counted_flops(node)
            flops[op] = flops.get(op, 0.0) + f
    return Examination(counts, list(ctx.unsupported), captured.method, flops,
                       sum(flops.values()))


def _counted_flops(node) -> float:
    """FLOPs of an op without a rule: torch's FLOP counter run on its shapes (no memory),
    at least one per output element."""
    from torch.utils.flop_counter import FlopCounterMode

    from ._torch import tree_map
    out = node.meta.get("val")
    elements = sum(v.numel() for v in tree_leaves(out) if isinstance(v, torch.Tensor))
    args, kwargs = tree_map(lambda a: a.meta.get("val") if isinstance(a, torch.fx.Node) else a,
                            (node.args, node.kwargs))
    try:
        with FlopCounterMode(display=False) as counter:
            if node.op == "call_method":
                getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                node.target(*args, **kwargs)
        return float(max(counter.get_total_flops(), elements))
    except Exception:  # noqa: BLE001 - an op the counter cannot run: its outputs' size
        return float(elements)


__all__ = ["compile", "plan", "examine", "Examination", "LazyParallel",
           "normalize_example_inputs", "plan_micro_batches", "parallel_module"]
