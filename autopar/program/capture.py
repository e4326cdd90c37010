"""Capture: a module or function and example inputs become one fx graph.

The captured graph takes the flat list of tensor inputs as placeholders, reads parameters and
buffers through ``get_attr`` nodes named by their FQNs in the original module, and returns a
flat tuple; :class:`Captured` keeps what is needed to bind a user's call to those placeholders
and to rebuild the user's output structure (tuple, dict, a transformers ModelOutput).

``torch.fx.symbolic_trace`` is tried first; where it fails (data-dependent Python, nested
containers of tensors, most Hugging Face models) Dynamo captures with ``fullgraph=True``
through a backend that records the graph and never runs it. Dynamo is tried too where the
trace holds calls that fx left opaque (functions registered with ``torch.fx.wrap``, as
torchvision's Swin attention and stochastic depth are): Dynamo traces into them, and no
rule could split them as one op.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import re
import sys
import threading
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .._torch import dynamo_ignoring, lazy_graph_module, tree_flatten, tree_unflatten
from ..errors import CaptureError, InputError
from .graph import (autograd_function, fetch_attr, replace_with_constant, setitem, user_frame,
                    write_buffer)
from .stand_ins import off_meta


@dataclass
class Captured:
    gm: fx.GraphModule
    signature: inspect.Signature | None
    input_names: list          # one per placeholder, for messages and readable code
    input_spec: object         # pytree spec of the tensor-bearing bound arguments
    example_inputs: list       # flat example tensors, one per placeholder
    output_spec: object        # pytree spec of the user's output
    output_leaves: list        # ("out", i) graph output i | ("in", i) input i | ("const", v)
    param_fqns: list = field(default_factory=list)
    buffer_fqns: list = field(default_factory=list)
    method: str = "symbolic_trace"

    def flatten_inputs(self, args, kwargs) -> list:
        """A call's tensor inputs in placeholder order, checked against the example's."""
        named = _bind(self.signature, args, kwargs)
        leaves, spec = tree_flatten(_tensor_bearing(named))
        if spec != self.input_spec:
            raise InputError(
                f"inputs do not have the structure planned for: expected {self.input_spec}, "
                f"got {spec}; call with the same arguments as example_inputs, or compile again")
        return leaves

    def unflatten_outputs(self, outs, inputs):
        leaves = []
        for kind, v in self.output_leaves:
            leaves.append(outs[v] if kind == "out" else inputs[v] if kind == "in" else v)
        return tree_unflatten(leaves, self.output_spec)


def normalize_example_inputs(example_inputs):
    """Example inputs as (args tuple, kwargs dict)."""
    if example_inputs is None:
        raise InputError("example_inputs is required: a tuple of positional arguments or a "
                         "dict of keyword arguments, e.g. example_inputs=(x,)")
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise InputError(f"example_inputs must be a tuple (positional) or a dict (keyword), "
                         f"got {type(example_inputs).__name__}")
    return example_inputs, {}


def _signature(fn):
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _bind(sig, args, kwargs) -> dict:
    if sig is None:
        return {f"arg{i}": a for i, a in enumerate(args)} | dict(kwargs)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(f"inputs do not match the forward signature {sig}: {e}; pass "
                         "example_inputs as a tuple of positional or a dict of keyword "
                         "arguments of that signature") from None
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            for i, v in enumerate(value):
                out[f"{name}_{i}"] = v
        elif kind == inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _tensor_bearing(named: dict) -> dict:
    return {k: v for k, v in named.items()
            if any(isinstance(x, torch.Tensor) for x in tree_flatten(v)[0])}


def _state(module) -> tuple:
    if not isinstance(module, torch.nn.Module):
        return {}, {}, {}
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    # plain tensor attributes (not registered) are constants of the program too
    consts = {}
    for mname, m in module.named_modules(remove_duplicate=False):
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor) and not k.startswith("_"):
                consts[f"{mname}.{k}".lstrip(".")] = v
    return params, buffers, consts


def capture(model, example_inputs) -> Captured:
    """Trace ``model`` (an nn.Module or a function of tensors) on ``example_inputs``."""
    args, kwargs = normalize_example_inputs(example_inputs)
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    sig = _signature(fn)
    named = _bind(sig, args, kwargs)
    try:
        with _state_kept(model), _custom_functions_left_to_dynamo():
            traced = _symbolic(model, sig, named)
    except Exception as first:  # noqa: BLE001 - any trace failure sends us to Dynamo
        try:
            return _dynamo(model, sig, args, kwargs, named)
        except CaptureError:
            raise
        except Exception as second:
            raise CaptureError(_not_captured(model, first, second)) from second
    if not _opaque_calls(traced.gm):
        return traced
    try:
        return _dynamo(model, sig, args, kwargs, named)
    except Exception:  # noqa: BLE001 - the trace stands, its opaque calls replicated
        return traced


def _not_captured(model, first, second) -> str:
    """Why neither fx nor Dynamo captured ``model``: the line of the user's code Dynamo
    stopped at, what kind of code that is, and what to do."""
    text = str(second)
    head = text.splitlines()[0] if text else ""
    tried = (f"fx.symbolic_trace failed with {type(first).__name__}: {first}; Dynamo "
             f"(fullgraph=True) failed with {type(second).__name__}: {head}")
    at = _user_line(text)
    where = f" at {at}" if at else ""
    if "data-dependent" in text:
        return (f"could not capture {type(model).__name__}{where}: it decides on a size or "
                "value known only from the data (an op such as nonzero, unique or "
                "masked_select, or .item()), and autopar plans for shapes known ahead; "
                "compute that part outside the model (pass no labels and compute the loss on "
                "its outputs) or write it without the decision (torch.where, a mask). "
                f"({tried})")
    raised = re.search(r"raised exception (.+)", text)
    if raised:   # Dynamo traced the model's own raise: one device raises it too
        return (f"could not capture {type(model).__name__}{where}: the model raises "
                f"{raised.group(1).strip()} there on these inputs, as it does on one device; "
                "fix what it says (a config value, an input) and plan again. "
                f"({tried})")
    return (f"could not capture {type(model).__name__}{where}: {tried}. Remove graph breaks "
            "(data-dependent Python control flow, .item(), printing) from forward, or run "
            "autopar.examine to see where")


def _user_line(text: str) -> str:
    """``file.py:line in function: `code``` of the last user frame in a Dynamo error's
    "from user code:" section; empty where there is none."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)',
                        text.split("from user code:")[-1])
    if "from user code:" not in text or not frames:
        return ""
    path, line, fn, code = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line} in {fn}: `{code.strip()}`"


def _opaque_calls(gm) -> list:
    """The call nodes of a symbolic trace whose target is a Python function outside torch:
    fx records such a call (a function registered with ``torch.fx.wrap``) without tracing
    into it; every other call it records is a torch op, a tensor method, an operator or one
    capture itself put in."""
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and inspect.isfunction(n.target)
            and (getattr(n.target, "__module__", None) or "").split(".")[0]
            not in ("torch", "autopar")]   # autopar's: the out-of-place forms capture writes


_PATCHING = threading.Lock()


@contextlib.contextmanager
def _custom_functions_left_to_dynamo():
    """fx traces into a ``torch.autograd.Function``'s forward and loses its backward (the
    gradient the user defined): a trace that meets one fails, and Dynamo, which keeps both,
    captures instead."""
    with _PATCHING:   # plans made side by side in threads patch and restore in turn
        original = torch.autograd.Function.__dict__["apply"]

        def apply(cls, *args, **kwargs):
            if any(isinstance(a, fx.Proxy) for a in tree_flatten((args, kwargs))[0]):
                raise CaptureError(f"{cls.__name__}.apply: a torch.autograd.Function, left "
                                   "to Dynamo")
            return original.__func__(cls, *args, **kwargs)

        torch.autograd.Function.apply = classmethod(apply)
        try:
            yield
        finally:
            torch.autograd.Function.apply = original


@contextlib.contextmanager
def _state_kept(model, strict: bool = True):
    """Put back any parameter or buffer that tracing assigned a new value to (``self.steps +=
    1`` assigns a Proxy under fx, a marker under Dynamo). With ``strict`` (fx), buffers are
    copies while tracing and the trace fails where one was assigned or written in place:
    fx runs an op on a buffer alone (``self.ema.mul_(0.9)``) on the tensor itself, so its
    graph misses it (Dynamo's records both)."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    held = [(owner, table, name, value) for owner in model.modules()
            for table in (owner._parameters, owner._buffers) for name, value in table.items()]
    copies = {}
    if strict:
        for owner, table, name, value in held:
            if table is owner._buffers and value is not None:
                copies[id(owner), name] = table[name] = value.detach().clone()
    versions = {key: t._version for key, t in copies.items()}
    try:
        yield
    finally:
        changed = [name for owner, table, name, value in held
                   if table.get(name) is not copies.get((id(owner), name), value) or
                   (id(owner), name) in copies and
                   copies[id(owner), name]._version != versions[id(owner), name]]
        for owner, table, name, value in held:
            table[name] = value
    if changed and strict:
        raise CaptureError(f"forward writes {changed}: left to Dynamo")


class _Tracer(fx.Tracer):
    """Traces through every module, so that all parameters appear as get_attr nodes."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = False  # autopar.source below is much cheaper

    def is_leaf_module(self, m, qualname):
        return False

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        frames, f = [], sys._getframe(1)
        while f is not None:  # (file, line) pairs only: reading source lines is slow
            frames.append((f.f_code.co_filename, f.f_lineno))
            f = f.f_back
        node.meta["autopar.source"] = user_frame(reversed(frames))
        return node


def _symbolic(model, sig, named) -> Captured:
    tensors = _tensor_bearing(named)
    if sig is None or any(not isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CaptureError("nested tensor inputs: left to Dynamo")
    concrete = {}
    for name, p in sig.parameters.items():
        if name in tensors:
            continue
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise CaptureError("variadic arguments: left to Dynamo")
        concrete[name] = named.get(name, p.default)
    tracer = _Tracer()
    root = model if isinstance(model, torch.nn.Module) else torch.nn.Module()
    graph = tracer.trace(model, concrete_args=concrete or None)
    gm = _graph_module(root, graph, type(model).__name__ if isinstance(model, torch.nn.Module)
                       else getattr(model, "__name__", "fn"))
    # drop placeholders of concrete arguments (fx keeps them, bound to their constants)
    names = []
    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            base = node.target.lstrip("*")
            if base in concrete:
                replace_with_constant(node, concrete[base])
            else:
                names.append(base)
    order = list(tensors)
    if names != order:
        raise CaptureError(f"traced inputs {names} differ from {order}: left to Dynamo")
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, spec = tree_flatten(out_node.args[0])
    out_leaves, flat = [], []
    for leaf in leaves:
        if isinstance(leaf, fx.Node):
            out_leaves.append(("out", len(flat)))
            flat.append(leaf)
        else:
            out_leaves.append(("const", leaf))
    out_node.args = (tuple(flat),)
    params, buffers, _ = _state(model)
    _check_no_constant_written(gm, {**params, **buffers})
    _functional_setitem(gm, set(params))
    _drop_unused(gm)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    gm.recompile()
    return Captured(gm, sig, names, tree_flatten(tensors)[1], list(tensors.values()), spec,
                    out_leaves, [k for k in params if k in used],
                    [k for k in used if k not in params], "symbolic_trace")


def _graph_module(root, graph, name: str) -> fx.GraphModule:
    """A GraphModule that writes its Python code when it is first read or called, not at each
    ``recompile()``: passes recompile after every rewrite, and writing the code of an 80-layer
    model takes longer than copying its layers."""
    return lazy_graph_module(root, graph, name)


def _custom_functions(gm) -> None:
    """Dynamo records a call of a ``torch.autograd.Function`` as ``autograd_function_apply``
    reading its forward and backward graphs as attributes: make it one call of
    :func:`~autopar.program.graph.autograd_function` on the tensor arguments alone (one
    function per pair of bodies alike, so repeated layers stay alike)."""
    made = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or \
                node.target is not torch.ops.higher_order.autograd_function_apply:
            continue
        bodies = [fetch_attr(gm, a.target) for a in node.args[:2]]
        pure = all(n.op != "get_attr" for b in bodies for n in b.graph.nodes)
        key = (bodies[0].code, bodies[1].code, repr(node.kwargs)) if pure else node
        if key not in made:
            made[key] = autograd_function(*bodies, dict(node.kwargs))
        node.target, node.args, node.kwargs = made[key], tuple(node.args[2:]), {}


def _check_no_constant_written(gm, state: dict) -> None:
    """fx reads a view of a buffer (``self.cache[0]``) as a constant taken while tracing;
    an op writing into one (``self.cache[0].add_(x)``) would update only that constant, and
    other reads of the buffer are constants too: left to Dynamo, which reads buffers."""
    for node in gm.graph.nodes:
        dst = node.args[0] if node.args else None
        if _impure(node) and getattr(dst, "op", None) == "get_attr" and \
                dst.target not in state:
            raise CaptureError(f"{node.name} writes into a constant fx took from the model "
                               f"({dst.target}): left to Dynamo")


def _drop_unused(gm):
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("call_function", "call_method", "get_attr") and not node.users \
                and node.op != "output" and not _impure(node):
            gm.graph.erase_node(node)


def _impure(node) -> bool:
    if node.op == "call_function" and node.target in (operator.setitem, write_buffer):
        return True
    return node.op == "call_method" and str(node.target).endswith("_") and \
        not str(node.target).startswith("__")


def _functional_setitem(gm, params: set) -> None:
    """Rewrite ``x[index] = value`` (Dynamo records ``operator.setitem``, a node with no users)
    into ``y = setitem(x, index, value)`` on a copy; later readers of ``x`` read ``y``. Where
    ``x`` is a buffer, :func:`~autopar.program.graph.write_buffer` then stores ``y`` into it.
    Writing into an input, a parameter or a view of a tensor read later is refused: each rank
    holds only a slice of inputs and parameters, and a copy would not update a view's base."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not operator.setitem:
            continue
        dst = node.args[0]
        buffer = isinstance(dst, fx.Node) and dst.op == "get_attr" and dst.target not in params
        if not isinstance(dst, fx.Node) or dst.op == "placeholder" or \
                dst.op == "get_attr" and not buffer or _aliases_read_later(dst, order, order[node]):
            what = f"{dst.op} {dst.target!r}" if isinstance(dst, fx.Node) else repr(dst)
            raise CaptureError(f"{node.name}: an indexed assignment writes into {what}, "
                               "an input, parameter or view of a tensor read later; write "
                               "it out of place (x = torch.where(mask, value, x), "
                               "x = x.index_put(...)) or into a fresh tensor (x.clone())")
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(setitem, node.args)
            if buffer:
                write = gm.graph.call_function(write_buffer, (dst, new))
                write.meta.update(node.meta)
        new.meta.update(node.meta)
        for user in list(dst.users):
            if user is not node and order.get(user, -1) > order[node]:
                user.replace_input_with(dst, new)
        gm.graph.erase_node(node)


def _is_view(node) -> bool:
    val = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val._is_view()


def _aliases_read_later(dst, order, after: int) -> bool:
    """Whether ``dst`` is a view (as Dynamo's example values tell) of a tensor that, or
    another view of which, is read by a node after position ``after``."""
    if not _is_view(dst):
        return False
    root = dst
    while _is_view(root) and root.args and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    seen, todo = set(), [root]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if n is not dst and user is not dst and order.get(user, -1) > after:
                return True  # later reads of dst itself read the copy
            if _is_view(user):
                todo.append(user)
    return False


def _dynamo(model, sig, args, kwargs, named) -> Captured:
    tensors = _tensor_bearing(named)
    flat_inputs, in_spec = tree_flatten(tensors)
    # the same tensor passed twice is one graph input to Dynamo; give each argument its own
    seen = set()
    for i, t in enumerate(flat_inputs):
        if id(t) in seen:
            flat_inputs[i] = t.clone()
        seen.add(id(flat_inputs[i]))
    given = flat_inputs
    with off_meta(model, flat_inputs) as (flat_inputs, originals):
        tensors = tree_unflatten(flat_inputs, in_spec)
        args, kwargs = _rebind(sig, args, kwargs, tensors)
        input_index = {id(t): i for i, t in enumerate(flat_inputs)}
        recorded, result = _dynamo_graph(model, args, kwargs)
    gm = recorded["gm"]
    params, buffers, consts = _state(model)
    # a tensor reachable by several names (tied weights: an LM head sharing the embedding)
    # is named by its first FQN, as ``named_parameters()`` and fx name it
    owners = {}
    for table in (params, buffers, consts):
        for fqn, t in table.items():
            owners.setdefault(id(t), fqn)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    order, used_params, used_buffers = [], [], []
    input_names = [_clean(str(k)) for k in _leaf_names(tensors)]
    for node, value in zip(placeholders, recorded["inputs"]):
        if id(value) in input_index:
            i = input_index[id(value)]
            order.append((i, node))
            continue
        value = originals.get(id(value), value)
        fqn = owners.get(id(value))
        if fqn is None:
            raise CaptureError(f"Dynamo lifted a tensor that is neither an input nor a "
                               f"parameter or buffer of the model: {node.name} "
                               f"{tuple(value.shape)}; register it as a buffer")
        _install(gm, fqn, value, fqn in params)
        (used_params if fqn in params else used_buffers).append(fqn)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(fqn)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
    # placeholders in user input order, named as the user's arguments
    order.sort(key=lambda t: t[0])
    if [i for i, _ in order] != list(range(len(flat_inputs))):
        raise CaptureError("some inputs were not traced as graph inputs (inputs Dynamo "
                           "specialized on); pass only tensors the model reads as inputs")
    # new placeholders go before the first node that stays (one being replaced may be first)
    replaced = {node for _, node in order}
    first = next(n for n in gm.graph.nodes if n not in replaced)
    for i, node in order:
        with gm.graph.inserting_before(first):
            ph = gm.graph.placeholder(input_names[i])
        ph.meta.update(node.meta)
        node.replace_all_uses_with(ph)
        gm.graph.erase_node(node)
    out_ids = {id(t): i for i, t in enumerate(recorded["outputs"]) if isinstance(t, torch.Tensor)}
    leaves, out_spec = tree_flatten(result)
    out_leaves = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and id(leaf) in out_ids:
            out_leaves.append(("out", out_ids[id(leaf)]))
        elif isinstance(leaf, torch.Tensor) and id(leaf) in input_index:
            out_leaves.append(("in", input_index[id(leaf)]))
        elif isinstance(leaf, torch.Tensor):
            raise CaptureError("an output tensor of the model is not produced by its graph; "
                               "return only values computed from the inputs")
        else:
            out_leaves.append(("const", leaf))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_node.args = (tuple(tree_flatten(out_node.args[0])[0]),)
    new = _graph_module(gm, gm.graph, type(model).__name__
                        if isinstance(model, torch.nn.Module) else "fn")
    _functional_setitem(new, set(used_params))
    _custom_functions(new)
    _drop_unused(new)
    new.recompile()
    return Captured(new, sig, input_names, in_spec, given, out_spec, out_leaves,
                    used_params, used_buffers, "dynamo")



def _dynamo_graph(model, args, kwargs):
    """Dynamo's graph of ``model(*args, **kwargs)`` (fullgraph): ({"gm", "inputs" (the
    tensors bound to its placeholders), "outputs" (markers standing for its outputs)},
    what the call returned, with the markers in place of the outputs)."""
    recorded = {}

    def backend(gm, example_inputs):
        recorded["gm"], recorded["inputs"] = gm, list(example_inputs)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        vals = [a.meta.get("example_value") if isinstance(a, fx.Node) else a
                for a in tree_flatten(out.args[0])[0]]

        def markers(*_):
            made = [torch.empty(v.shape, dtype=v.dtype, device="meta")
                    if isinstance(v, torch.Tensor) else v for v in vals]
            recorded["outputs"] = made
            return tuple(made)

        return markers

    torch.compiler.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with dynamo_ignoring(_logging_methods()), _state_kept(model, strict=False):
        result = compiled(*args, **kwargs)
    torch.compiler.reset()
    return recorded, result


def _logging_methods() -> set:
    """Every method of ``logging.Logger``, those libraries add included (transformers'
    ``warning_once``): Dynamo refuses logger calls under fullgraph unless told to skip them,
    and a log message changes nothing the graph computes."""
    import logging
    return {fn for name, fn in vars(logging.Logger).items()
            if callable(fn) and not name.startswith("_")}


def _rebind(sig, args, kwargs, tensors: dict):
    """(args, kwargs) with the tensor-bearing arguments replaced by those in ``tensors``."""
    if sig is None:
        return args, kwargs
    bound = sig.bind(*args, **kwargs)
    for name, value in list(bound.arguments.items()):
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            bound.arguments[name] = {k: tensors.get(k, v) for k, v in value.items()}
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            bound.arguments[name] = tuple(tensors.get(f"{name}_{i}", v)
                                          for i, v in enumerate(value))
        elif name in tensors:
            bound.arguments[name] = tensors[name]
    return bound.args, bound.kwargs


def _leaf_names(tree: dict) -> list:
    from .._torch import keystr, tree_flatten_with_path
    return [keystr(path) for path, _ in tree_flatten_with_path(tree)[0]]


def _clean(text: str) -> str:
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", text).strip("_")
    return name if name and not name[0].isdigit() else f"x_{name}"


def _install(root: torch.nn.Module, fqn: str, value, is_param: bool):
    *path, last = fqn.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if is_param:
        mod.register_parameter(last, value if isinstance(value, torch.nn.Parameter)
                               else torch.nn.Parameter(value, requires_grad=False))
    else:
        mod.register_buffer(last, value)
