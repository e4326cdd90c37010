"""normalize_graph: give every call node its canonical op name and make in-place ops pure."""

from __future__ import annotations

import operator

from torch.fx import Node

from autopar.errors import CaptureError
from autopar.program.graph import copy_into, setitem, where, write_buffer
from autopar.rules.names import canonical_name
from autopar.rules.traits import VIEWS, VIEWS_OF_CONTIGUOUS

_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub,
                      operator.imul: operator.mul, operator.itruediv: operator.truediv}


def normalize_graph(gm, ctx):
    """Name each op in one vocabulary; rewrite in-place tensor ops out of place.

    Writes ``node.meta["autopar.op"]``. An in-place op ``y = x.add_(z)`` becomes
    ``y = x.add(z)`` and later readers of ``x`` read ``y``. Where ``x`` is a buffer (or what
    an earlier in-place op on one returned), :func:`~autopar.program.graph.write_buffer`
    stores ``y`` into it right after, so that every rank's copy holds what one device's
    would. An in-place op on an indexed view, ``x[..., :n].copy_(y)``, also puts
    ``x = setitem(x, index, result)`` after it, so later readers of ``x`` (or of the buffer
    ``x``) see the write. Mutating an input, a parameter, or another view (``x.view(...)``,
    ``x.transpose(...)``) of a value read later is refused: each rank holds only its own slice
    of inputs and parameters, and a copy would not update a view's base.
    """
    _one_read_per_attr(gm.graph)
    params = set(ctx.param_fqns)
    buffer_of = {}     # node -> the get_attr of the buffer it holds the new value of
    last_write = {}    # buffer get_attr -> its latest write_buffer node
    for node in list(gm.graph.nodes):
        inplace = _inplace_base(node)
        if inplace is not None:
            _out_of_place(gm.graph, node, inplace, params, buffer_of, last_write)
        if node.op in ("call_function", "call_method"):
            node.meta["autopar.op"] = canonical_name(node)
        else:
            node.meta["autopar.op"] = node.op
    gm.graph.lint()
    gm.recompile()
    return gm


def _out_of_place(graph, node, inplace: str, params: set, buffer_of: dict,
                  last_write: dict) -> None:
    """Rewrite the in-place op ``node`` out of place; see :func:`normalize_graph`."""
    src = node.args[0]
    base, index = _indexed(src)
    if base is not None:
        buffer = None
        base_buffer = _written_buffer(node, base, params, buffer_of)
    else:
        buffer = _written_buffer(node, src, params, buffer_of)
        _check_no_view_read_later(node, src)
    if inplace == "copy":
        node.op, node.target = "call_function", copy_into
        node.args, node.kwargs = node.args[:2], {}
    else:
        node.target = inplace
    _read_after(node, src, node)
    if base is not None and (base_buffer is not None or _read_later(node, base)):
        with graph.inserting_after(node):
            whole = graph.call_function(setitem, (base, index, node))
        whole.meta.update(_carried(node.meta))
        whole.meta["autopar.op"] = canonical_name(whole)
        _read_after(whole, base, whole)
        node, buffer = whole, base_buffer
    if buffer is not None:
        _write(graph, node, buffer, last_write)
        buffer_of[node] = buffer


def _indexed(node):
    """``(x, index)`` where ``node`` is a view ``x[index]`` of a tensor ``x`` (not an input,
    not an element of an op's tuple of outputs); ``(None, None)`` otherwise."""
    if not (isinstance(node, Node) and node.op == "call_function" and
            node.target is operator.getitem and isinstance(node.args[0], Node)):
        return None, None
    base, index = node.args[0], node.args[1]
    tuple_out = isinstance(base.meta.get("example_value"), (tuple, list)) or \
        isinstance(index, int) and base.op in ("call_function", "call_method") and \
        canonical_name(base) in _TUPLE_OUTPUTS
    if tuple_out or base.op == "placeholder":
        return None, None
    return base, index


# ops whose output is a tuple of tensors: x[0] of one is a value, not a view to write into
_TUPLE_OUTPUTS = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes", "topk",
                  "sort", "max", "min", "median", "mode", "kthvalue", "var_mean", "std_mean",
                  "aminmax", "cummax", "cummin", "frexp", "unique", "where", "nonzero"}


def _read_after(node, old, new) -> None:
    """Readers of ``old`` after ``node`` (``new`` itself aside) read ``new``."""
    for user in list(old.users):
        if user is not node and user is not new and _after(node, user):
            user.replace_input_with(old, new)


def _read_later(node, value) -> bool:
    return any(user is not node and _after(node, user) for user in value.users)


def _check_no_view_read_later(node, src) -> None:
    """An in-place op on a view (other than by index) of a value read later would have to
    change that value too: refused, naming the op."""
    for base in _viewed(src):
        if _read_later(node, base):
            path, loc = where(node)
            raise CaptureError(
                f"{node.name} ({path} {loc}): the in-place op {node.target} writes into "
                f"{src.name}, a view of {base.name}, which is read later; write it out of "
                "place (y = x.view(...) + z, then use y), or index the base: "
                "x[..., :n].copy_(z)")


# ops whose output shares its input's storage: the views of rules.traits, and indexing
_VIEWS = VIEWS | VIEWS_OF_CONTIGUOUS | {"getitem", "select", "narrow", "slice", "as_strided",
                                        "diagonal", "unflatten"}


def _viewed(node):
    """The values ``node`` is a view of, nearest first, through view ops."""
    while isinstance(node, Node) and node.op in ("call_function", "call_method") and \
            canonical_name(node) in _VIEWS and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
        yield node


def _carried(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if not k.startswith("autopar.")
            and k not in ("val", "example_value")}


def _one_read_per_attr(graph) -> None:
    """One get_attr node per parameter or buffer: a value read twice is one value, and a
    buffer written between two reads is read after the write through the first."""
    first = {}
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        if node.target in first:
            node.replace_all_uses_with(first[node.target])
            graph.erase_node(node)
        else:
            first[node.target] = node


def _written_buffer(node, src, params: set, buffer_of: dict):
    """The buffer get_attr the in-place op ``node`` on ``src`` writes into, None for an activation;
    raises CaptureError for an input, a parameter or a view of a buffer."""
    if src in buffer_of:
        return buffer_of[src]
    op = getattr(src, "op", None)
    if op == "get_attr" and src.target not in params:
        return src
    if op in ("placeholder", "get_attr"):
        what = "an input" if op == "placeholder" else "a parameter"
        raise CaptureError(
            f"{node.name}: the in-place op {node.target} writes into {op} {src.target!r} "
            f"({what}); autopar shards inputs and "
            "parameters, so write the op out of place (e.g. x = x + y)")
    base = _viewed_buffer(src, params)
    if base is not None:
        raise CaptureError(
            f"{node.name}: the in-place op {node.target} writes into a view of buffer "
            f"{base.target!r}; "
            "autopar writes buffers whole: compute the new buffer out of place and copy it "
            f"in whole (buf.copy_(new))")
    return None


def _viewed_buffer(node, params: set):
    """The buffer get_attr ``node`` is a view of, through view ops; None where it is none."""
    root = next(iter(reversed(list(_viewed(node)))), None)
    if root is not None and root.op == "get_attr" and root.target not in params:
        return root
    return None


def _write(graph, node, buffer, last_write: dict) -> None:
    """Store ``node``'s value into ``buffer`` right after it, replacing an earlier write of
    the same buffer (its value is overwritten, and readers read values, not the buffer)."""
    with graph.inserting_after(node):
        write = graph.call_function(write_buffer, (buffer, node))
    write.meta.update(_carried(node.meta))
    write.meta["autopar.op"] = canonical_name(write)
    if buffer in last_write:
        graph.erase_node(last_write[buffer])
    last_write[buffer] = write


def _inplace_base(node):
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        if isinstance(node.args[0], Node):
            return _INPLACE_OPERATORS[node.target]
    if node.op == "call_method":
        t = str(node.target)
        if t.endswith("_") and not t.startswith("_") and t not in ("requires_grad_",):
            return t[:-1]
    return None


def _after(a, b) -> bool:
    """True when node ``b`` comes after node ``a`` in graph order."""
    n = a.next
    while n.op != "root":
        if n is b:
            return True
        n = n.next
    return False
