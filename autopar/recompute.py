"""Activation recomputation: per block, what stays saved for backward and what is computed
again.

A block is one instance of a repeated block (a transformer layer, ``h.3``), as
:func:`autopar.passes.fold_repeated_blocks` finds them. Each takes one of three choices:

``none``       every op saves what its backward needs (the default).
``selective``  the block's matmul-like ops keep their outputs; every other op (norms,
               pointwise, softmax, dropout) is computed again in backward from them.
               Megatron-LM's selective recomputation (Korthikanti et al., 2022) drops the
               attention core's saved activations this way for a few percent more FLOPs.
``full``       only the block's inputs stay saved; its whole forward runs again in
               backward (about one more forward pass, 33% more FLOPs).

The rank program applies a choice with ``torch.utils.checkpoint.checkpoint(...,
use_reentrant=False)``, a selective one with a policy from
``create_selective_checkpoint_contexts``. This module holds what a choice means (which ops a
selective block keeps) and the user's pins; :mod:`autopar.planner` weighs the choices.
"""

from __future__ import annotations

import fnmatch

from .cost import CONTRACTIONS
from .errors import PlanError, closest

CHOICES = ("none", "selective", "full")

# Under "selective", the outputs of these ops stay saved (and are not computed again); every
# other op of the block is recomputed.
KEPT_BY_SELECTIVE = frozenset(CONTRACTIONS)


def block_paths(blocks) -> list:
    """The module path of every block instance, in graph order."""
    return [inst.path for cls in blocks for inst in cls.instances]


def resolve_recompute(request, paths) -> dict:
    """``request`` (glob over block paths -> choice, or one choice for every block) as
    block path -> choice, for the blocks it names."""
    if request is None:
        return {}
    if isinstance(request, str):
        request = {"*": request}
    if not isinstance(request, dict):
        raise PlanError(f"recompute={request!r}: give a choice ({', '.join(CHOICES)}) or a "
                        "dict of block globs to choices, e.g. {'layers.*': 'full'}")
    out = {}
    for pattern, choice in request.items():
        if choice not in CHOICES:
            raise PlanError(f"recompute[{pattern!r}] = {choice!r}: choose one of "
                            f"{', '.join(CHOICES)}")
        matched = [p for p in paths if fnmatch.fnmatchcase(p, pattern)]
        if not matched:
            raise PlanError(f"recompute pattern {pattern!r} matches no block; the blocks are "
                            f"{_some(paths)} (closest: {closest(pattern.replace('*', ''), paths)})")
        for p in matched:
            out[p] = choice
    return out


def _some(paths, n: int = 4) -> str:
    if not paths:
        return "none (the program has no repeated blocks)"
    shown = ", ".join(repr(p) for p in paths[:n])
    return shown + (f" ... ({len(paths)} in all)" if len(paths) > n else "")
