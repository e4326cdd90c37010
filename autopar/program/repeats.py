"""Folded capture: trace a deep model with each run of identical layers cut to two.

Tracing costs time per layer (Dynamo takes about 0.17 s for each layer of a LLaMA-style
model), while planning needs each distinct layer once. So before tracing, every
``nn.ModuleList`` or ``nn.Sequential`` whose children are all alike (one class, the same
parameter and buffer shapes, dtypes and plain attributes) and number at least
:data:`MIN_REPEATS` is cut to its first two children. The model is traced, normalized,
annotated and simplified at that depth; then :func:`passes.expand_repeats` copies the second
layer's nodes once for every layer left out, chaining each copy to the one before as the
second layer is chained to the first.

Two traced layers are needed: the second shows which of a layer's inputs are the previous
layer's outputs (the chain) and which come from outside (masks, rotary tables), and that the
program a layer computes does not change from one layer to the next. If the two layers'
programs differ (a forward that branches on the layer's index), or the model does not run
with fewer layers, the model is traced again at full depth.

Limits: a forward whose per-layer program changes only after the second layer (``if i == 5``)
is not detected; plan with ``fold=False`` for such models.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..errors import AutoparError

MIN_REPEATS = 3   # with fewer layers, cutting saves nothing


@dataclass
class Repeat:
    """A run of identical layers traced as two: where it is and what the others hold."""

    path: str                   # the container's FQN ("layers", "model.decoder.layers")
    count: int                  # how many layers it really has
    tensors: dict = field(default_factory=dict)   # FQN -> tensor of the layers left out
    params: set = field(default_factory=set)      # which of those FQNs are parameters


def repeated_lists(model) -> list:
    """:class:`Repeat` for every container of at least MIN_REPEATS alike children,
    outermost first (a container inside a repeated layer is left alone)."""
    if not isinstance(model, torch.nn.Module):
        return []
    out = []
    for path, m in model.named_modules():
        if not isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        if any(path.startswith(r.path + ".") for r in out):
            continue
        children = list(m._modules.values())
        if len(children) < MIN_REPEATS or any(c is None for c in children):
            continue
        keys = [_signature(c) for c in children]
        if all(k == keys[0] for k in keys[1:]) and len({id(c) for c in children}) == \
                len(children):
            rep = Repeat(path, len(children))
            for i, child in enumerate(children[2:], start=2):
                prefix = f"{path}.{i}." if path else f"{i}."
                for name, p in child.named_parameters(remove_duplicate=False):
                    rep.tensors[prefix + name] = p
                    rep.params.add(prefix + name)
                for name, b in child.named_buffers(remove_duplicate=False):
                    rep.tensors[prefix + name] = b
            out.append(rep)
    return out


def _signature(module) -> tuple:
    """What must agree for two layers to compute the same program: module classes, tensor
    shapes, dtypes and trainability, and plain attribute values. An attribute holding the
    layer's own index (``layer_idx``) differs between layers by design and is left out;
    whether the forward reads it is checked on the traced program."""
    out = []
    for name, m in module.named_modules():
        attrs = tuple(sorted((k, v) for k, v in vars(m).items()
                             if not k.startswith("_") and k not in _INDEX_ATTRS
                             and isinstance(v, (int, float, str, bool, type(None)))))
        out.append((name, type(m).__qualname__, attrs))
    for name, p in module.named_parameters(remove_duplicate=False):
        out.append((name, tuple(p.shape), p.dtype, p.requires_grad))
    for name, b in module.named_buffers(remove_duplicate=False):
        out.append((name, tuple(b.shape), b.dtype))
    return tuple(out)


_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_index", "block_idx", "idx")


@contextlib.contextmanager
def cut_to_two(repeats: list):
    """Within the block, each container of ``repeats`` (found on ``model``) holds only its
    first two children."""
    saved = []
    try:
        for rep, container in repeats:
            saved.append((container, container._modules))
            container._modules = OrderedDict(list(container._modules.items())[:2])
        yield
    finally:
        for container, modules in saved:
            container._modules = modules


def containers(model, repeats: list) -> list:
    """(repeat, its container module) pairs."""
    return [(r, model.get_submodule(r.path) if r.path else model) for r in repeats]


class Unrepeatable(AutoparError):
    """The two traced layers do not compute the same program: trace at full depth. Never
    reaches users: :func:`autopar.api` catches it."""
