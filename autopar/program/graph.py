"""Small helpers over fx graphs shared by capture and the passes."""

from __future__ import annotations

import contextlib
import gc
import os
from copy import deepcopy

import torch
import torch.fx as fx
from torch.fx import Node

from .._torch import lazy_graph_module


def fetch_attr(module, target: str):
    """The attribute at dotted path ``target`` of ``module`` (a get_attr node's value)."""
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def replace_with_constant(node: Node, value) -> None:
    """Substitute ``value`` for ``node`` in the arguments of every user, then drop it."""
    for user in list(node.users):
        # map_aggregate: through slices too (x[:, :n] with n a size)
        user.args = fx.node.map_aggregate(user.args, lambda a: value if a is node else a)
        user.kwargs = fx.node.map_aggregate(user.kwargs, lambda a: value if a is node else a)
    node.graph.erase_node(node)


def module_path(node: Node) -> str:
    """The FQN of the module a node was traced in ("" at the top level)."""
    if "autopar.module_path" in node.meta:  # a copy of a traced layer (passes.expand_repeats)
        return node.meta["autopar.module_path"]
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        for root in TRACED_ROOTS:   # Dynamo names modules from the one it was called on
            if path == root:
                return ""
            if path.startswith(root + "."):
                return path[len(root) + 1:]
        if not path.startswith(("L[", "G[")):   # fx: the FQN itself
            return path
        # a module Dynamo reached through a global or another argument: not the model's
    return ""


# How Dynamo names the module it traces: ``self`` of its forward, or the first argument of
# ``Module.__call__`` (torch >= 2.10 traces the call).
TRACED_ROOTS = ("L['self']", "L['args'][0]")


def where(node: Node) -> tuple:
    """(module path, "file:line") a node came from, as far as the trace recorded it."""
    path = module_path(node)
    if node.meta.get("autopar.source"):
        return path or node.name, node.meta["autopar.source"]
    frames = []
    for line in (node.meta.get("stack_trace") or "").strip().splitlines():
        line = line.strip()
        parts = line.split('"')
        if line.startswith("File ") and len(parts) >= 3:
            frames.append((parts[1], int(line.split("line ")[-1].split(",")[0])))
    return path or node.name, user_frame(frames)


def user_frame(frames) -> str:
    """"file.py:line" of the innermost frame outside torch and autopar, from
    ``(filename, lineno, ...)`` tuples or ``traceback.FrameSummary`` entries."""
    import autopar
    skip = (os.path.dirname(torch.__file__), os.path.dirname(autopar.__file__),
            os.path.dirname(os.path.dirname(autopar.__file__)) + os.sep + "passes")
    for frame in reversed(list(frames)):
        filename, lineno = frame[0], frame[1]
        if not filename.startswith(skip) and not filename.startswith("<"):
            return f"{os.path.basename(filename)}:{lineno}"
    return ""


def setitem(x, index, value):
    """``x[index] = value`` on a copy of ``x``: the out-of-place form of an indexed
    assignment, which capture puts in its place."""
    out = x.clone()
    out[index] = value
    return out


def autograd_function(forward: fx.GraphModule, backward: fx.GraphModule, options: dict):
    """The call of a user's ``torch.autograd.Function`` as one op: its forward and backward
    graphs (as Dynamo records them) applied to the op's tensor arguments, its own backward
    run in backward. Readable in a rank program, and one function for identical bodies so
    that repeated layers stay alike."""
    apply = torch.ops.higher_order.autograd_function_apply

    def autograd_function(*args):
        return apply(forward, backward, *args, **options)

    autograd_function.forward_graph, autograd_function.backward_graph = forward, backward
    return autograd_function


def copy_into(x, src):
    """``x.copy_(src)`` out of place: ``src`` cast to ``x``'s dtype and broadcast to its
    shape, a new tensor (normalize_graph puts it in the place of ``copy_``)."""
    return src.to(device=x.device, dtype=x.dtype).expand(x.shape).clone()


@fx.node.has_side_effect
def write_buffer(buffer, value):
    """Store ``value`` into ``buffer`` in place, outside autograd, and return ``buffer``: the
    write of a buffer's new value (a running mean, a step counter) that normalize_graph puts
    right after the out-of-place op computing it. Readers after it read ``value`` itself."""
    with torch.no_grad():
        buffer.copy_(value)
    return buffer


def is_foldable_constant(val) -> bool:
    if isinstance(val, (int, float, bool, str, type(None), torch.dtype, torch.device)):
        return True
    if isinstance(val, (tuple, list, torch.Size)):
        return all(is_foldable_constant(v) for v in val)
    return False


def as_constant(val):
    if isinstance(val, torch.Size):
        return tuple(int(v) for v in val)
    if isinstance(val, (tuple, list)):
        return type(val)(as_constant(v) for v in val) if not isinstance(val, torch.Size) else val
    return val


@contextlib.contextmanager
def paused_gc():
    """Capture and planning make and drop millions of small objects, freed by their
    reference counts; the cyclic collector would walk the whole heap (the program's graph
    with it) again and again for nothing: a fifth of the time on large models. What cycles
    they leave are collected once it runs again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule of a copy of ``gm``'s graph on the same attributes (parameters are not
    copied): each node a new one with a shallow copy of its ``meta`` (``Graph.__deepcopy__``
    copies node by node), so that passes may rewrite the copy and its facts while ``gm``
    stays as it was. Lazy, as capture makes it: its code is written when first read."""
    copy = lazy_graph_module(gm, deepcopy(gm.graph), gm.__class__.__name__)
    copy.meta = dict(getattr(gm, "meta", {}))
    return copy


def loss_index(values) -> int | None:
    """Which of a step's outputs is its loss: the first floating-point scalar of ``values``
    (tensors, or a graph's output nodes by their ``meta["val"]``); None where there is none.
    ``ParallelModule.step`` runs its backward and returns it, the planner prices it as the
    one output a training step gives back, and the other outputs are neither gathered nor
    held for the caller there."""
    for i, v in enumerate(values):
        v = v.meta.get("val") if isinstance(v, Node) else v
        if isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point():
            return i
    return None


def loss_only(gm: fx.GraphModule, index: int) -> fx.GraphModule:
    """A program computing only output ``index`` of ``gm`` (its loss): the other outputs
    None, and what only they needed (the collectives that gather them whole) dropped.
    Shares ``gm``'s parameters."""
    graph = deepcopy(gm.graph)
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = (tuple(v if k == index else None for k, v in enumerate(out.args[0])),)
    graph.eliminate_dead_code()
    graph.lint()
    return fx.GraphModule(gm, graph, "RankStep")


def block_of(module_path: str) -> str:
    """The block a module path belongs to: up to and including its first numeric part
    (``h.0.attn.c_attn`` -> ``h.0``), else its first part."""
    parts = [p for p in module_path.split(".") if p]
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return parts[0] if parts else ""


def tensor_names(module) -> dict:
    """First FQN -> every name ``module`` holds that parameter or buffer by, first included
    (a tied weight has several; the first is the one ``named_parameters()`` gives)."""
    names = {}
    for name, t in [*module.named_parameters(remove_duplicate=False),
                    *module.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(name)
    return {found[0]: found for found in names.values()}
