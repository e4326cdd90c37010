"""expand_repeats: put back the layers a folded capture left out, as copies of a traced one."""

from __future__ import annotations

from torch.fx import map_arg

from autopar.program.capture import _install as install_attr
from autopar.program.graph import module_path
from autopar.program.repeats import Unrepeatable

from .fold_repeated_blocks import BlockInstance, _instance, _Labeler, block_prefix

_CALLS = ("call_function", "call_method", "call_module")


def expand_repeats(gm, ctx):
    """Copy the second traced layer of each cut container once per layer left out.

    Reads ``ctx.repeats`` (from :mod:`autopar.program.repeats`) and ``node.meta`` of the traced
    layers; writes the copies with the same ``node.meta`` (``"val"``, ``"autopar.op"``, ...),
    ``"autopar.module_path"`` naming their own layer, and extends ``ctx.param_fqns``. Raises
    :class:`Unrepeatable` when the two traced layers differ, or when the program reads a
    layer's output anywhere but in the next layer and after the last one.
    """
    for rep in getattr(ctx, "repeats", ()):
        _expand(gm, ctx, rep)
    if getattr(ctx, "repeats", ()):
        gm.graph.lint()
        gm.recompile()
    return gm


def _layer(nodes, prefix: str) -> list:
    out = []
    for n in nodes:
        if n.op == "get_attr":
            path = n.target
        elif n.op in _CALLS:
            path = module_path(n)
        else:
            continue
        if block_prefix(path) == prefix:
            out.append(n)
    return out


def _expand(gm, ctx, rep):
    base = f"{rep.path}." if rep.path else ""
    a, b = _traced_layers(gm, ctx, rep, base)
    made = set(a.nodes)
    # input k of a layer -> the index of the previous layer's output it is
    chain = {k: a.outputs.index(x) for k, x in enumerate(b.inputs) if x in made}
    if not chain:
        raise Unrepeatable(f"{rep.path}: layer 1 does not read layer 0")
    copies = _copy_layers(gm, ctx, rep, base, b, chain)
    if not copies:
        return
    # readers after the cut layers read the last copy
    inside = set(b.nodes).union(*(inst.nodes for inst in copies))
    for out, new in zip(b.outputs, copies[-1].outputs):
        for user in list(out.users):
            if user not in inside:
                user.replace_input_with(out, new)


def _traced_layers(gm, ctx, rep, base: str) -> tuple:
    """Layers 0 and 1 as block instances, checked to compute one program and to be read,
    layer 0 by layer 1 only."""
    nodes = list(gm.graph.nodes)
    first = _layer(nodes, block_prefix(base + "0"))
    second = _layer(nodes, block_prefix(base + "1"))
    if not first or not second:
        raise Unrepeatable(f"{rep.path}: its first two layers were not traced")
    a, b = _instance(base + "0", first), _instance(base + "1", second)
    labeler = _Labeler(set(ctx.param_fqns), ctx.options)
    if labeler.structure(a) != labeler.structure(b):
        raise Unrepeatable(f"{rep.path}: layers 0 and 1 compute different programs")
    inside_b = set(b.nodes)
    if any(u not in inside_b for n in a.outputs for u in n.users):
        raise Unrepeatable(f"{rep.path}: a layer's output is read outside the next layer")
    return a, b


def _copy_layers(gm, ctx, rep, base: str, b, chain: dict) -> list:
    """Copies of layer ``b`` for layers 2 and on, right after it, each reading the one before;
    their get_attr nodes read the layers' own tensors, installed on ``gm``."""
    graph, prev, out = gm.graph, b, []
    # what each node of layer 1 names below the layer's own path, to name its copies by
    cut = len(base + "1")
    tails = [(module_path(n)[cut:], n.target[cut:] if n.op == "get_attr" else None)
             for n in b.nodes]
    with graph.inserting_before(b.nodes[-1].next):
        for j in range(2, rep.count):
            prefix = f"{base}{j}"
            env = {x: prev.outputs[chain[k]] if k in chain else x for k, x in enumerate(b.inputs)}
            for n, (path_tail, attr_tail) in zip(b.nodes, tails):
                target = n.target if attr_tail is None else prefix + attr_tail
                env[n] = c = _copy_node(graph, n, target, env)
                c.meta["autopar.module_path"] = prefix + path_tail
                if attr_tail is not None:
                    install_attr(gm, target, rep.tensors[target], target in rep.params)
                    if target in rep.params:
                        ctx.param_fqns.append(target)
            prev = BlockInstance(prefix, [env[n] for n in b.nodes], [env[x] for x in b.inputs],
                                 [env[n] for n in b.outputs])
            out.append(prev)
    return out


def _copy_node(graph, node, target, env: dict):
    """A copy of ``node`` calling ``target`` on ``env[x]`` for each input ``x``, with its meta,
    at the graph's insert point."""
    # arguments are set after creation: create_node walks them looking for raw SymInts, a
    # pytree walk that costs more than the rest of it, and a copy of a node already in the
    # graph holds none
    c = graph.create_node(node.op, target, None, None, node.name, node.type)
    if node.args:
        c.args = map_arg(node.args, env.__getitem__)
    if node.kwargs:
        c.kwargs = map_arg(node.kwargs, env.__getitem__)
    c.meta.update(node.meta)
    return c
