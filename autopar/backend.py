"""autopar as a torch.compile backend: ``torch.compile(model, backend=autopar.backend(cluster))``.

Dynamo hands a backend each graph it captured with the module's parameters and buffers lifted
to graph inputs, and passes the user's own full tensors at every call. A backend therefore
cannot keep shards of them: the module and its optimizer stay as they are, and every rank
holds (and updates) every parameter. What the backend does change is the work: each graph is
planned like :func:`autopar.compile` plans a model, and every rank runs its rank program on
its share of the inputs and of the parameters' compute, with the collectives of the plan.

- Parameters and buffers are planned as replicated (``R`` on every axis), which is how the user
  holds them; the planner splits their use (a column-parallel linear takes its slice of a
  replicated weight) and prices what that costs. A constraint on a parameter overrides this.
- Each parameter enters the rank program whole and moves to its planned layout with the same
  differentiable collectives as every other edge; the gradient sums (and the all-gather of a
  split parameter's gradient) leave every rank's ``param.grad`` equal to the single-device
  gradient, so any optimizer keeps the replicas identical.
- Outputs come back replicated, as from :class:`autopar.ParallelModule`.

Plans are made at a graph's first call and kept per distinct input shapes, so a graph Dynamo
made dynamic is planned again (and cached) at each new shape.
"""

from __future__ import annotations

import keyword
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx

from ._torch import register_dynamo_backend, tree_flatten, tree_unflatten
from .cost.cluster import Cluster
from .errors import PlanError
from .program.graph import replace_with_constant

# ``import autopar`` imports this module, so what imports DTensor and the planner (placement,
# cost, redistribute, runtime) is imported in the functions that use it.


def backend(cluster=None, *, simulate=False, mesh=None, constraints=None, storage=None,
            level="full", memory_budget_bytes=None, precision="fp32", optimizer="adamw",
            fold=True):
    """A torch.compile backend that plans every captured graph for ``cluster``.

    >>> import torch, autopar
    >>> be = autopar.backend(autopar.Cluster.local(2, measure=False), simulate=True)
    >>> fc = torch.nn.Linear(8, 4)
    >>> y = torch.compile(fc, backend=be)(torch.randn(6, 8))
    >>> be.graphs[0].plan.mesh
    {'dp': 2}

    cluster: the devices to plan for; by default ``Cluster.local()``, sized by the process
        group, or one device where no process group is initialized.
    simulate: run every rank inside this process and return rank 0's outputs (no process
        group needed). Otherwise each process of a ``torch.distributed`` group is one rank
        and the group's world size must equal the cluster's device count; with no process
        group, a one-device cluster runs its program in this process.
    mesh, constraints, storage, level, memory_budget_bytes, precision, optimizer, fold: as
        for :func:`autopar.compile`; constraints name parameters by their FQNs in the module
        and inputs by their argument names. Parameters not pinned are stored replicated (as
        the module holds them) and used as the plan finds best.

    ``torch.compile(model, backend="autopar")`` uses ``backend()`` with these defaults.
    """
    return Backend(cluster, simulate=simulate, mesh=mesh, constraints=constraints,
                   storage=storage, level=level,
                   memory_budget_bytes=memory_budget_bytes, precision=precision,
                   optimizer=optimizer, fold=fold)


class Backend:
    """What :func:`backend` returns: a callable Dynamo hands each graph it captures.

    ``graphs`` lists one :class:`CompiledGraph` per graph, in the order Dynamo compiled them
    (one per graph break and per recompilation), each with its ``plan`` and ``code``.
    """

    def __init__(self, cluster=None, *, simulate=False, **options):
        from .api import _check_cluster
        from .options import Options
        if cluster is not None:
            _check_cluster(cluster)
        if not isinstance(simulate, bool):
            raise PlanError(f"simulate={simulate!r}: pass True (every rank in this process) "
                            "or False (one process per rank)")
        self.cluster, self.simulate, self.options = cluster, simulate, Options(**options)
        if (self.options.pipeline_stages or 1) > 1:
            raise PlanError(f"mesh={dict(self.options.mesh)}: the torch.compile backend plans "
                            "each graph Dynamo hands it as one stage (Dynamo may break the "
                            "model into several graphs); for pipeline stages compile the "
                            "model with autopar.compile(model, cluster, mesh=...)")
        self.graphs = []

    def __call__(self, gm: fx.GraphModule, example_inputs) -> "CompiledGraph":
        compiled = CompiledGraph(self, gm, example_inputs)
        self.graphs.append(compiled)
        return compiled

    def resolve_cluster(self) -> Cluster:
        if self.cluster is None:
            initialized = dist.is_available() and dist.is_initialized()
            self.cluster = Cluster.local() if initialized else Cluster.local(1)
        return self.cluster


# -- what Dynamo hands over ------------------------------------------------------------------

_MODULE_KEY = re.compile(r"\._(?:modules|parameters|buffers)\[['\"](.*?)['\"]\]")
_STATE = re.compile(r"\._(?:parameters|buffers)\[")


def _dynamo_source(node: fx.Node) -> str:
    """Where Dynamo read a graph input from, e.g. ``L['self']._modules['fc1']._parameters[
    'weight']``, or "" if it did not say. ``node.meta["grapharg"]`` is Dynamo's own record
    (private), checked with torch 2.13, where ``source.name`` is a property; earlier versions
    made it a method, which is read too."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return ""
    name = source.name
    return name() if callable(name) else str(name)


def _input_name(source: str, fallback: str) -> str:
    """A readable argument name from a Dynamo source: ``L['x']`` -> ``x``."""
    keys = re.findall(r"\[['\"]?([^'\"\]]+)['\"]?\]|\.(\w+)", source)
    parts = [a or b for a, b in keys]
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", "_".join(parts)).strip("_") or fallback
    return name if not name[0].isdigit() else f"x_{name}"


@dataclass
class _GraphInput:
    kind: str        # "state" (a parameter or buffer), "input" (a tensor) or "value" (a size)
    name: str        # FQN for state, argument name for inputs


def _classify(gm: fx.GraphModule, example_inputs) -> list:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out, taken = [], set()
    for node, value in zip(placeholders, example_inputs):
        source = _dynamo_source(node)
        if not isinstance(value, torch.Tensor):
            out.append(_GraphInput("value", node.name))
            continue
        if _STATE.search(source) or isinstance(value, torch.nn.Parameter):
            fqn = ".".join(_MODULE_KEY.findall(source)) or node.name
            out.append(_GraphInput("state", fqn))
            continue
        base = name = _input_name(source, node.name)
        i = 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        out.append(_GraphInput("input", name))
    return out


def _install(root: torch.nn.Module, fqn: str, value: torch.Tensor):
    *path, last = fqn.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if isinstance(value, torch.nn.Parameter):
        mod.register_parameter(last, value)
    else:
        mod.register_buffer(last, value)


def _specialize(gm: fx.GraphModule, kinds: list, args) -> tuple:
    """A copy of Dynamo's graph for these call arguments, as the passes take a captured one:
    parameters and buffers read by ``get_attr`` at their FQNs, sizes folded to constants,
    tensor inputs as placeholders named like the arguments, and a flat tuple output.
    Returns (graph module, input names, example inputs, output spec, output leaves)."""
    graph = fx.Graph()
    val_map = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    root = torch.nn.Module()
    state = []
    names, inputs = [], []
    for node, kind, value in zip(placeholders, kinds, args):
        if kind.kind == "input":
            new = graph.placeholder(kind.name)
            names.append(new.name)
            inputs.append(value)
        else:
            new = graph.placeholder(node.name)  # replaced below, once every node is copied
            if kind.kind == "state":
                state.append((new, kind.name, value))
        new.meta = dict(node.meta)
        val_map[node] = new
    out = graph.graph_copy(gm.graph, val_map)
    leaves, spec = tree_flatten(out)
    nodes = [x for x in leaves if isinstance(x, fx.Node)]
    graph.output(tuple(nodes))
    kept = iter(range(len(nodes)))
    out_leaves = [("out", next(kept)) if isinstance(x, fx.Node) else ("const", x)
                  for x in leaves]
    for node, kind, value in zip(placeholders, kinds, args):
        if kind.kind == "value":
            replace_with_constant(val_map[node], value)
    for ph, fqn, value in state:
        if not _has_path(root, fqn):
            _install(root, fqn, value)
        with graph.inserting_before(ph):
            attr = graph.get_attr(fqn)
        attr.meta = dict(ph.meta)
        ph.replace_all_uses_with(attr)
        graph.erase_node(ph)
        if not attr.users:
            graph.erase_node(attr)
    graph.lint()
    return fx.GraphModule(root, graph, "DynamoGraph"), names, inputs, spec, out_leaves


def _has_path(module, fqn: str) -> bool:
    obj = module
    for part in fqn.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


# -- planning ----------------------------------------------------------------------------------

def _plan_graph(gm, names, inputs, cluster, options):
    """Run autopar's passes on a specialized graph; parameters and buffers not pinned are
    stored replicated (as the module under torch.compile holds them). Returns the pass
    context."""
    from autopar.passes import PIPELINE, PassContext, run_passes
    start = time.perf_counter()
    fqns = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    free = [f for f in fqns if not options.pinned(f)]
    options = options.replace(storage={**{f: "R" for f in free}, **options.storage})
    ctx = PassContext(cluster=cluster, options=options, example_inputs=list(inputs),
                      input_names=list(names), param_fqns=fqns)
    run_passes(gm, ctx, PIPELINE)
    ctx.stats["seconds"]["total"] = time.perf_counter() - start
    ctx.stats["nodes"] = sum(1 for _ in gm.graph.nodes)
    ctx.stats["capture_method"] = "torch.compile backend"
    ctx.stats["fallback_ops"] = sorted({u[0] for u in ctx.unsupported})
    return ctx


def take_full_state(program, kinds: list) -> tuple:
    """The rank program with parameters and buffers as graph inputs, in Dynamo's order.

    Each enters whole (replicated) and moves to its planned layout by the collectives of the
    layout table (``shard``: free forward, gradient gathered in backward); one whose gradient
    sum :class:`~autopar.ParallelModule` defers to after backward gets ``grad_sum`` here, as
    its gradient lands in the user's parameter. Returns (graph module, layouts by node name).
    """
    from .program.placement import replicated
    from .program.redistribute import plan_steps
    from .runtime import collectives as C
    g = fx.Graph()
    layouts = dict(program.layouts)
    axis_names = program.mesh.names
    by_fqn = {fqn: (name, layout) for name, (fqn, layout) in program.attrs.items()}
    src_inputs = iter(n for n in program.graph.nodes if n.op == "placeholder")
    val_map, attr_values = {}, {}
    for kind in kinds:
        if kind.kind == "value":
            continue
        if kind.kind == "input":
            src = next(src_inputs)
            val_map[src] = g.placeholder(src.name)
            continue
        if kind.name not in by_fqn or by_fqn[kind.name][0] in attr_values:
            g.placeholder(_identifier(kind.name + "_unused"))
            continue
        name, layout = by_fqn[kind.name]
        v = g.placeholder(_identifier(name))
        cur = list(replicated(len(layout)))
        layouts[v.name] = tuple(cur)
        for step in plan_steps(tuple(cur), tuple(layout)):  # R -> S(i): shard steps only
            fn, extra = C.step_call(step, axis_names)
            cur[step.axis] = layout[step.axis]
            v = _call(g, fn, (v, *extra), layouts, cur)
        for axis in program.grad_sync.get(name, ()):
            v = _call(g, C.grad_sum, (v, axis), layouts, cur)
        attr_values[name] = v
    for node in program.graph.nodes:
        if node.op == "get_attr":
            val_map[node] = attr_values[node.target]
    g.output(g.graph_copy(program.graph, val_map))
    g.lint()
    return fx.GraphModule(torch.nn.Module(), g, "RankProgram"), layouts


def _identifier(name: str) -> str:
    """A placeholder name from an attribute name (``0_weight`` of an nn.Sequential is not)."""
    name = re.sub(r"\W", "_", name)
    return name if name.isidentifier() and not keyword.iskeyword(name) else f"p_{name}"


def _call(g, fn, args, layouts, layout):
    n = g.call_function(fn, args)
    n.meta["autopar.op"] = fn.__name__
    layouts[n.name] = tuple(layout)
    return n


# -- running -----------------------------------------------------------------------------------

@dataclass
class _Planned:
    plan: object
    program: fx.GraphModule
    layouts: dict
    mesh: object
    device_mesh: object
    out_spec: object
    out_leaves: list


class CompiledGraph:
    """One graph Dynamo captured, planned at its first call with each distinct input shape.

    Called with Dynamo's graph inputs (user inputs, the module's full parameters and buffers,
    sizes); returns the graph's outputs, replicated.
    """

    def __init__(self, owner: Backend, gm: fx.GraphModule, example_inputs):
        self._owner = owner
        self._gm = gm
        self._kinds = _classify(gm, example_inputs)
        self._planned = {}
        self._last = None

    @property
    def plan(self):
        """The plan of the most recent call's shapes."""
        return self._latest().plan

    @property
    def plans(self) -> list:
        """Every plan made for this graph so far, one per distinct input shapes."""
        return [p.plan for p in self._planned.values()]

    @property
    def code(self) -> str:
        """The rank program of the most recent call's shapes, layouts in comments."""
        from .runtime.code import annotate_code
        p = self._latest()
        header = (f"# autopar rank program (torch.compile backend): mesh {p.mesh}, plan "
                  f"{p.plan.fingerprint()}\n# parameters and buffers are graph inputs, whole; "
                  "layouts: R replicated, S(d) split on dim d, P partial sum\n")
        return header + annotate_code(p.program.code.strip("\n"), p.layouts) + "\n"

    def _latest(self) -> _Planned:
        if self._last is None:
            raise PlanError("this graph has not run yet: call the compiled model once")
        return self._last

    def _key(self, args) -> tuple:
        return tuple((tuple(a.shape), a.dtype, a.requires_grad) if isinstance(a, torch.Tensor)
                     else ("value", a) for a in args)

    def __call__(self, *args):
        from .runtime import collectives as C
        from .runtime.simulate import run_replicated
        key = self._key(args)
        planned = self._planned.get(key)
        if planned is None:
            planned = self._planned[key] = self._make(args)
        self._last = planned
        tensors = [a for a, k in zip(args, self._kinds) if k.kind != "value"]
        if planned.device_mesh is not None:
            C.set_active_mesh(planned.device_mesh)
            outs = planned.program(*tensors)
        else:
            outs = run_replicated([planned.program] * planned.mesh.size, planned.mesh,
                                  list(tensors))
        leaves = [outs[v] if kind == "out" else v for kind, v in planned.out_leaves]
        return tree_unflatten(leaves, planned.out_spec)

    def _make(self, args) -> _Planned:
        owner = self._owner
        cluster = owner.resolve_cluster()
        device_mesh_needed = not owner.simulate and cluster.world_size > 1
        initialized = dist.is_available() and dist.is_initialized()
        if not owner.simulate and initialized and dist.get_world_size() != cluster.world_size:
            raise PlanError(
                f"autopar.backend: the cluster {cluster} has {cluster.world_size} devices but "
                f"torch.distributed has world size {dist.get_world_size()}; launch "
                f"{cluster.world_size} processes, or pass a cluster of "
                f"{dist.get_world_size()} devices (autopar.Cluster.local() takes the group's)")
        if device_mesh_needed and not initialized:
            raise PlanError(
                f"autopar.backend: the cluster {cluster} has {cluster.world_size} devices but "
                "torch.distributed is not initialized; launch one process per device with "
                "torchrun and call init_process_group(), or pass simulate=True to run every "
                "rank in this process")
        gm, names, inputs, spec, leaves = _specialize(self._gm, self._kinds, args)
        ctx = _plan_graph(gm, names, inputs, cluster, owner.options)
        program, layouts = take_full_state(ctx.program, self._kinds)
        device_mesh = None
        if not owner.simulate and initialized:
            from .runtime.module import _init_distributed
            device_mesh = _init_distributed(ctx.plan, ctx.mesh)
        return _Planned(ctx.plan, program, layouts, ctx.mesh, device_mesh, spec, leaves)


def _registered(gm, example_inputs):
    """``backend="autopar"``: :func:`backend` with its defaults, one per graph."""
    return backend()(gm, example_inputs)


def register() -> None:
    """Register ``"autopar"`` with torch.compile unless Dynamo finds it by itself, by the
    ``torch_dynamo_backends`` entry point installing autopar declares (then this only looks).
    (:func:`autopar._torch.register_dynamo_backend`)."""
    from importlib.metadata import entry_points
    if entry_points(group="torch_dynamo_backends", name="autopar"):
        return
    register_dynamo_backend(_registered, "autopar")


__all__ = ["backend", "Backend", "CompiledGraph", "register"]
