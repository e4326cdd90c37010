"""Activation recomputation at run time: one block of a rank program under
``torch.utils.checkpoint``.

:func:`autopar.passes.generate_rank_program` outlines every block whose recompute choice
(``plan.recompute``, see :mod:`autopar.search.recompute`) is not "none" into a GraphModule of its own:
the block's ops and the collectives on the edges into them, its parameters passed in as
arguments. The rank program calls it through a :class:`Recomputed` named for the block
(``autopar_runtime_checkpoint_h_0(...)`` in ``pm.code``), which runs it with
:func:`run_checkpointed`:

``full``       ``checkpoint(fn, *args, use_reentrant=False)``: only the arguments stay
               saved; backward runs the whole block again, its collectives included.
``selective``  the same with a policy (:func:`selective_policy`) that keeps the outputs of
               the matmul-like ops and of every collective, so backward runs no collective
               again, and recomputes the rest (norms, pointwise ops, softmax, dropout).

Randomness: checkpoint restores the generator state the block's forward started from before
it recomputes, so ops that draw random numbers draw the same ones again as long as they run
again in the same order. The selective policy therefore recomputes every op that draws and
never keeps one: a kept draw (attention with dropout) would be skipped in the recomputation
and shift the numbers of every later draw.
"""

from __future__ import annotations

import functools
import re

import torch
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from ..rules.traits import KEPT_BY_SELECTIVE

# The aten ops each fx-level op of KEPT_BY_SELECTIVE reaches the dispatcher as (CPU and CUDA
# kernels, and the math fallbacks), besides any aten op of the op's own name. linear and
# matmul are composite: they arrive as addmm, mm or bmm; attention as its fused kernels or,
# with dropout on CPU, as bmm around softmax and dropout.
_DISPATCHED = {
    "linear": ("addmm", "mm", "bmm"),
    "matmul": ("mm", "bmm", "mv", "dot"),
    "einsum": ("mm", "bmm"),
    "addbmm": ("addbmm", "bmm"),
    "scaled_dot_product_attention": (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable", "bmm", "baddbmm"),
    "multi_head_attention_forward": ("_native_multi_head_attention", "addmm", "mm", "bmm",
                                     "baddbmm"),
}

# collectives of torch.distributed._functional_collectives (and their waits)
COMMUNICATION_NAMESPACES = frozenset({"_c10d_functional", "c10d_functional"})
# the simulator's collective over every rank (autopar.runtime.simulate)
SIMULATED_COLLECTIVE = "autopar::simulated_collective"

CHOICES = ("selective", "full")


def kept_aten_ops(names=KEPT_BY_SELECTIVE) -> frozenset:
    """The aten op packets whose outputs a selective block keeps, for fx-level op ``names``.

    >>> import torch
    >>> torch.ops.aten.mm in kept_aten_ops({"linear"})
    True
    """
    out = set()
    for name in names:
        for candidate in (*_DISPATCHED.get(name, ()), name):
            if hasattr(torch.ops.aten, candidate):
                out.add(getattr(torch.ops.aten, candidate))
    return frozenset(out)


_KEPT = kept_aten_ops()
def _dropout_p(func, args, kwargs) -> float:
    # OpOverload._schema (private, stable; checked with torch 2.5 through 2.13) names the
    # arguments: the fused attention kernels take dropout_p at different positions.
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "dropout_p":
            value = kwargs.get("dropout_p", args[i] if i < len(args) else arg.default_value)
            return float(value or 0.0)
    return 1.0  # seeded, without a dropout_p argument: it draws


def draws_random(func, args=(), kwargs=None) -> bool:
    """Whether aten op ``func`` draws from a random generator with these arguments (the
    fused attention kernels are tagged as seeded but draw only with dropout)."""
    if torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ()):
        return False
    return _dropout_p(func, args, kwargs or {}) > 0.0


def selective_policy(ctx, func, *args, **kwargs):
    """What a selective block keeps: outputs of matmul-like ops and of collectives; random
    draws and everything else are computed again in backward."""
    if draws_random(func, args, kwargs):
        return CheckpointPolicy.MUST_RECOMPUTE
    if communicates(func) or getattr(func, "overloadpacket", None) in _KEPT:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def communicates(func) -> bool:
    """Whether aten-level op ``func`` is a collective (a real one or the simulator's)."""
    if getattr(func, "namespace", None) in COMMUNICATION_NAMESPACES:
        return True
    name = getattr(func, "name", None)
    return callable(name) and name() == SIMULATED_COLLECTIVE


def run_checkpointed(fn, choice: str, *args):
    """``fn(*args)``, its activations recomputed in backward as ``choice`` says."""
    if choice == "full":
        return checkpoint(fn, *args, use_reentrant=False)
    if choice == "selective":
        return checkpoint(fn, *args, use_reentrant=False, context_fn=functools.partial(
            create_selective_checkpoint_contexts, selective_policy))
    raise ValueError(f"recompute choice {choice!r}: a checkpointed block is 'selective' or "
                     "'full' ('none' runs the block in the program itself)")


class Recomputed:
    """One outlined block of a rank program, called with its inputs (activations and
    parameters); runs ``graph_module`` under :func:`run_checkpointed`. Named for the block,
    so the rank program reads ``autopar_runtime_checkpoint_h_0(...)``."""

    def __init__(self, path: str, choice: str, graph_module: torch.fx.GraphModule):
        if choice not in CHOICES:
            raise ValueError(f"block {path!r}: recompute choice {choice!r} is not one of "
                             f"{', '.join(CHOICES)}")
        self.path, self.choice, self.graph_module = path, choice, graph_module
        self.__name__ = identifier(path)

    def __call__(self, *args):
        return run_checkpointed(self.graph_module, self.choice, *args)

    def __repr__(self) -> str:
        return f"Recomputed({self.path!r}, {self.choice!r})"


def identifier(path: str) -> str:
    """A Python name for a block path: ``h.0`` -> ``h_0``."""
    name = re.sub(r"\W", "_", path) or "block"
    return f"_{name}" if name[0].isdigit() else name
