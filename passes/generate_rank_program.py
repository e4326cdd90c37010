"""generate_rank_program: rewrite the planned graph into the SPMD program every rank runs."""

from __future__ import annotations

import inspect
import operator
import re

import torch
import torch.fx as fx
from torch.fx import Node

from autopar._torch import tree_map
from autopar.errors import PlanError
from autopar.program.placement import Replicate, local_shape, replicated
from autopar.program.redistribute import plan_steps
from autopar.rules import shape_of, tensor_inputs
from autopar.runtime import local_ops
from autopar.runtime.checkpoint import Recomputed, identifier
from autopar.runtime.code import RankProgram
from autopar.runtime.collectives import gather_shards, grad_sum, step_call
from autopar.search.pricing import fused_axis, grad_sum_axes, needs_grad

_BLOCK = "autopar.recompute_block"   # on nodes of the flat program: the recomputed block


def generate_rank_program(gm, ctx):
    """Emit local shapes, local parameter shards and a collective on every edge whose layouts
    differ, with the gradient-sum rule; outputs come back replicated. Every block that
    ``ctx.plan.recompute`` recomputes becomes one call of its outlined ops under
    ``torch.utils.checkpoint``.

    Reads ``node.meta["autopar.strategy"]``, ``"autopar.layout"``, ``"val"``,
    ``"autopar.block"``; sets ``ctx.program``.
    """
    mesh = ctx.mesh
    g = fx.Graph()
    emit = _Emitter(g, mesh.names, mesh.shape)
    emit.deferred = deferred_gradient_sums(gm)
    choices = recompute_choices(ctx)
    env, attrs, input_shapes, grad_sync = {}, {}, [], {}
    for node in gm.graph.nodes:
        emit.block = None
        if node.op == "placeholder":
            p = g.placeholder(node.name)
            emit.layouts[p.name] = replicated(mesh.ndim)
            val = node.meta["val"]
            input_shapes.append((node.name, tuple(val.shape), val.dtype, val.requires_grad))
            env[node] = emit.convert(p, replicated(mesh.ndim), node.meta["autopar.layout"])
        elif node.op == "get_attr":
            name = _attr_name(node.target, attrs)
            attrs[name] = (node.target, node.meta["autopar.layout"])
            summed = tuple(mesh.names[a] for a in emit.deferred.get(node, ())
                           if mesh.shape[a] > 1)   # over one rank a sum is the value
            if summed:
                grad_sync[name] = summed
            a = g.get_attr(name)
            emit.layouts[a.name] = node.meta["autopar.layout"]
            env[node] = a
        elif node.op in ("call_function", "call_method"):
            emit.block = choices.get(node.meta.get("autopar.block"))
            env[node] = _emit_op(node, env, emit, mesh)
        elif node.op == "output":
            outs = [emit.convert(env[v], v.meta["autopar.layout"], replicated(mesh.ndim))
                    for v in node.args[0]]
            g.output(tuple(outs))
    g.lint()
    g, recomputed, notes = outline_recomputed_blocks(g)
    g.lint()
    ctx.program = RankProgram(g, attrs, mesh, input_shapes, emit.layouts, grad_sync,
                              recomputed, notes)
    return gm


def recompute_choices(ctx) -> dict:
    """(block class id, instance index) -> (the same, path, choice) for the block instances
    the plan recomputes (``node.meta["autopar.block"]`` names a node's block so). Instances
    are told apart by their ids: blocks found as repeated runs may share a path."""
    plan = getattr(ctx, "plan", None)
    wanted = {p: c for p, c in (getattr(plan, "recompute", None) or {}).items() if c != "none"}
    out, found = {}, set()
    for class_id, cls in enumerate(getattr(ctx, "blocks", None) or []):
        for index, inst in enumerate(cls.instances):
            if inst.path in wanted:
                choice = wanted[inst.path]
                if choice not in ("selective", "full"):
                    raise PlanError(f"plan.recompute[{inst.path!r}] = {choice!r}: choose one "
                                    "of none, selective, full")
                out[(class_id, index)] = (class_id, index, inst.path, choice)
                found.add(inst.path)
    missing = sorted(set(wanted) - found)
    if missing:
        known = [i.path for c in getattr(ctx, "blocks", None) or [] for i in c.instances]
        raise PlanError(f"plan.recompute names {missing}, which are not blocks of this program "
                        f"(its blocks: {known[:6]}); plan again for this model")
    return out


def outline_recomputed_blocks(graph: fx.Graph) -> tuple:
    """Move the nodes of every recomputed block (``node.meta["autopar.recompute_block"]``)
    into a GraphModule of its own, called where the block ends by a
    :class:`~autopar.runtime.checkpoint.Recomputed`; its outputs keep their names.

    Returns the new graph, the Recomputed calls in order and a comment per call node."""
    members = {}
    for n in graph.nodes:
        if _BLOCK in n.meta:
            members.setdefault(n.meta[_BLOCK], []).append(n)
    if not members:
        return graph, [], {}
    taken = {n.name for n in graph.nodes}
    ends = {nodes[-1]: key for key, nodes in members.items()}
    new, env, recomputed, notes = fx.Graph(), {}, [], {}
    for n in graph.nodes:
        if _BLOCK not in n.meta:
            env[n] = new.node_copy(n, lambda a: _defined(env, a, n))
        elif n in ends:
            (_, _, path, choice), nodes = ends[n], members[ends[n]]
            block, inputs, outputs = _outline(path, choice, nodes)
            call = new.create_node("call_function", block, tuple(env[a] for a in inputs),
                                   name=_free_name(identifier(path), taken))
            call.meta["autopar.op"] = "checkpoint"
            notes[call.name] = f"{path or call.name}: {choice} recomputation in backward"
            for i, out in enumerate(outputs):
                env[out] = new.create_node("call_function", operator.getitem, (call, i),
                                           name=out.name)
                env[out].meta = {k: v for k, v in out.meta.items() if k != _BLOCK}
                env[out].meta["autopar.op"] = "getitem"
            recomputed.append(block)
    return new, recomputed, notes


def _defined(env, value, user):
    assert value in env, (f"{user.name} reads {value.name} before its recomputed block ends: "
                          "a block's nodes must be contiguous in the program")
    return env[value]


def _outline(path, choice, nodes) -> tuple:
    """The block's own program: its inputs (values from outside, parameters among them) as
    placeholders, its nodes read outside as a tuple output."""
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    sub, env = fx.Graph(), {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
    for n in nodes:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[o] for o in outputs))
    sub.lint()
    gm = fx.GraphModule(torch.nn.Module(), sub, f"Block_{identifier(path)}")
    return Recomputed(path, choice, gm), inputs, outputs


def _free_name(base: str, taken: set) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def deferred_gradient_sums(gm) -> dict:
    """Trainable parameters whose every use sums its gradient over the same axes (and none
    gathers it): their sums run once per backward on the accumulated gradient, in buckets,
    instead of once per use (data-parallel gradient sync). Parameter node -> axes.

    Only axes on which the parameter is stored replicated qualify: where it is stored split
    and gathered before use, the ranks of a group hold different slices, whose gradients
    must be summed before slicing, not after."""
    out = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not needs_grad(node):
            continue
        stored = node.meta["autopar.layout"]
        per_use = set()
        for user in node.users:
            strat = user.meta.get("autopar.strategy")
            if strat is None:
                per_use.add(None)
                continue
            for src, need in zip(tensor_inputs(user), strat.inputs):
                if src is node:
                    axes = grad_sum_axes(src, need, strat.output)
                    fused = fused_axis(node.meta["autopar.layout"], need)
                    per_use.add(None if fused in axes else axes)
        if len(per_use) == 1 and None not in per_use and per_use != {()}:
            axes = per_use.pop()
            if all(isinstance(stored[a], Replicate) for a in axes):
                out[node] = axes
    return out


def _emit_op(node, env, emit, mesh):
    strat = node.meta["autopar.strategy"]
    local = {}
    for src, need in zip(tensor_inputs(node), strat.inputs):
        # gradient-sum rule: a replicated input of work split over an axis gets only a
        # partial gradient there, so its backward all-reduces over that axis
        axes = () if src in emit.deferred else grad_sum_axes(src, need, strat.output)
        have = src.meta["autopar.layout"]
        fused = fused_axis(have, need)
        if fused in axes:  # gathered just before: reduce-scatter the gradient back instead
            v = emit.convert(env[src], have, need, fuse_last=True)
            axes = tuple(a for a in axes if a != fused)
        else:
            v = emit.convert(env[src], have, need)
        for axis in axes:
            if mesh.shape[axis] > 1:   # over one rank a sum is the value
                v = emit.call(grad_sum, (v, mesh.names[axis]), need)
        local[src] = v
    args = tree_map(lambda a: local.get(a, env.get(a)) if isinstance(a, Node) else a, node.args)
    kwargs = tree_map(lambda a: local.get(a, env.get(a)) if isinstance(a, Node) else a,
                      node.kwargs)
    if strat.spec.rewrite is not None:
        args, kwargs = strat.spec.rewrite(args, kwargs,
                                          local_shape(shape_of(node), strat.output, mesh.shape))
    op, target = node.op, node.target
    if strat.spec.local is not None:
        swap = strat.spec.local(strat.inputs, strat.output, mesh.names)
        if swap is not None and swap[0] in local_ops.STEPS:   # several steps, each a call
            return _emit_steps(node, emit, swap, args, kwargs, strat.output)
        if swap is not None:  # a local computation that depends on the rank's coordinates
            op, (name, extra) = "call_function", swap
            target = getattr(local_ops, name)
            kwargs = dict(kwargs, **extra)
    n = emit.tag(emit.graph.create_node(op, target, tuple(args), dict(kwargs), name=node.name))
    n.meta["autopar.op"] = node.meta["autopar.op"]
    emit.layouts[n.name] = strat.output
    return n


def _emit_steps(node, emit, swap, args, kwargs, layout):
    """A local computation of several steps (:data:`autopar.runtime.local_ops.STEPS`), one
    call each, so that the rank program shows each exchange: the last takes the node's
    name, and each takes the extra keywords of ``swap`` it names."""
    name, extra = swap
    names, steps = local_ops.STEPS[name]
    values = {**dict(zip(names, args)), **kwargs}
    for i, (fn, takes) in enumerate(steps):
        last = i == len(steps) - 1
        own = {k: v for k, v in extra.items() if k in inspect.signature(fn).parameters}
        # an argument the call leaves out (a convolution's bias) is None
        n = emit.tag(emit.graph.create_node(
            "call_function", fn, tuple(values.get(k) for k in takes), own,
            name=node.name if last else f"{node.name}_{fn.__name__}"))
        n.meta["autopar.op"] = node.meta["autopar.op"] if last else fn.__name__
        emit.layouts[n.name] = layout
        values["input"] = n
    return n


class _Emitter:
    def __init__(self, graph, axis_names, axis_sizes):
        self.graph = graph
        self.axis_names = axis_names
        self.axis_sizes = axis_sizes
        self.layouts = {}
        self.deferred = {}
        self.block = None   # (class id, index, path, choice) of the recomputed block emitted
        self._cache = {}

    def call(self, fn, args, layout):
        n = self.tag(self.graph.call_function(fn, args))
        n.meta["autopar.op"] = fn.__name__
        self.layouts[n.name] = layout
        return n

    def tag(self, node):
        """Mark ``node`` as part of the recomputed block being emitted, if any: the op and
        the collectives on the edges into it."""
        if self.block is not None:
            node.meta[_BLOCK] = self.block
        return node

    def convert(self, value, src, dst, fuse_last=False):
        """``value`` held in layout ``src`` -> the same value in layout ``dst``, made once
        for every consumer that needs it so; with ``fuse_last`` the final all_gather becomes
        ``gather_shards``, whose backward reduce-scatters the gradients its consumers add
        up (each rank's a partial sum, as every consumer fusing it has)."""
        key = (value, tuple(dst), fuse_last)
        if key in self._cache:
            return self._cache[key]
        cur = list(src)
        out = value
        steps = plan_steps(tuple(src), tuple(dst))
        for i, step in enumerate(steps):
            fn, extra = step_call(step, self.axis_names)
            if fuse_last and i == len(steps) - 1:
                fn = gather_shards
            cur[step.axis] = dst[step.axis] if step.kind not in ("all_gather", "all_reduce") \
                else Replicate()
            if self.axis_sizes[step.axis] == 1:
                continue   # on one rank every layout holds the whole value: nothing moves
            out = self.call(fn, (out, *extra), tuple(cur))
        self._cache[key] = out
        return out


def _attr_name(fqn: str, taken: dict) -> str:
    base = re.sub(r"[^0-9a-zA-Z_]", "_", fqn)
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name
