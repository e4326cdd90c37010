"""expand_repeats: put back the layers a folded capture left out, as copies of a traced one."""

from __future__ import annotations

from autopar.capture import _install as install_attr
from autopar.graph_utils import module_path
from autopar.repeats import Unrepeatable

from .fold_repeated_blocks import BlockInstance, _instance, _Labeler, block_prefix

_CALLS = ("call_function", "call_method", "call_module")


def expand_repeats(gm, ctx):
    """Copy the second traced layer of each cut container once per layer left out.

    Reads ``ctx.repeats`` (from :mod:`autopar.repeats`) and ``node.meta`` of the traced
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
    nodes = list(gm.graph.nodes)
    base = f"{rep.path}." if rep.path else ""
    first = _layer(nodes, block_prefix(base + "0"))
    second = _layer(nodes, block_prefix(base + "1"))
    if not first or not second:
        raise Unrepeatable(f"{rep.path}: its first two layers were not traced")
    a, b = _instance(base + "0", first), _instance(base + "1", second)
    labeler = _Labeler(set(ctx.param_fqns), list(ctx.constraints or {}))
    if labeler.structure(a) != labeler.structure(b):
        raise Unrepeatable(f"{rep.path}: layers 0 and 1 compute different programs")
    inside_b = set(b.nodes)
    if any(u not in inside_b for n in a.outputs for u in n.users):
        raise Unrepeatable(f"{rep.path}: a layer's output is read outside the next layer")
    made = set(a.nodes)
    chain = {}   # input k of a layer -> the index of the previous layer's output it is
    for k, x in enumerate(b.inputs):
        if x in made:
            chain[k] = a.outputs.index(x)
    if not chain:
        raise Unrepeatable(f"{rep.path}: layer 1 does not read layer 0")
    prev, last = b, b.nodes[-1]
    old_prefix, copied = base + "1", set()
    for j in range(2, rep.count):
        new_prefix = f"{base}{j}"
        env = {}
        for k, x in enumerate(b.inputs):
            env[x] = prev.outputs[chain[k]] if k in chain else x
        copies = []
        for n in b.nodes:
            with gm.graph.inserting_after(last):
                c = gm.graph.node_copy(n, lambda x: env[x])
            c.meta = dict(n.meta)
            c.meta["autopar.module_path"] = new_prefix + module_path(n)[len(old_prefix):]
            if n.op == "get_attr":
                c.target = new_prefix + n.target[len(old_prefix):]
                install_attr(gm, c.target, rep.tensors[c.target], c.target in rep.params)
                if c.target in rep.params:
                    ctx.param_fqns.append(c.target)
            env[n] = c
            copies.append(c)
            last = c
        copied.update(copies)
        prev = BlockInstance(new_prefix, copies, [env[x] for x in b.inputs],
                             [env[n] for n in b.outputs])
    # readers after the cut layers read the last copy
    for out, new in zip(b.outputs, prev.outputs):
        for user in list(out.users):
            if user not in inside_b and user not in copied:
                user.replace_input_with(out, new)
