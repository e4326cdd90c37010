"""Local computations that depend on the rank's place on the mesh.

An op rule names one of these by its name here (``OpSpec.local``) for layouts whose local work
is not the op itself on the local pieces. Each takes the axes it depends on; it reads this rank's
coordinates from the active DeviceMesh, or, in a simulated run (all ranks in one process),
from ``coords`` (axis name -> (coordinate, size)), which the simulator passes.
"""

from __future__ import annotations

import torch

from ..program.placement import StridedShard


def rank_aware(fn):
    """Mark ``fn`` as reading the rank's coordinates: the simulator passes ``coords``."""
    fn.rank_aware = True
    return fn


def _place(axes: tuple, coords) -> tuple:
    """(index, count) of this rank's block when a dim is split over ``axes``, outer first."""
    if coords is None:
        from .collectives import _coord, _size
        coords = {a: (_coord(a), _size(a)) for a in axes}
    index, count = 0, 1
    for a in axes:
        c, n = coords[a]
        index, count = index * n + c, count * n
    return index, count


@rank_aware
def grouped_mm_local_experts(x, w, offs, *, axes: tuple, coords=None):
    """Expert parallel ``grouped_mm_fallback(x, w, offs)``: ``w`` holds this rank's experts
    (the weight split on its expert dim over ``axes``); the rows of those experts are
    computed, every other row is zero, and the sum over the ranks is the whole output.

    ``x`` (rows grouped by expert) and ``offs`` (each expert's cumulative row end) are whole.
    """
    index, _ = _place(axes, coords)
    per_rank = w.shape[0]
    first = index * per_rank
    ends = offs.tolist()
    start = ends[first - 1] if first else 0
    stop = ends[first + per_rank - 1]
    local = offs[first:first + per_rank] - start
    y = torch.ops.transformers.grouped_mm_fallback(x[start:stop], w, local.to(offs.dtype))
    zeros = y.new_zeros
    return torch.cat([zeros(start, y.shape[1]), y, zeros(x.shape[0] - stop, y.shape[1])])


def _piece(whole: torch.Tensor, shards: tuple, coords) -> torch.Tensor:
    """This rank's piece of ``whole`` under ``shards``: (axis, dim, segments) per mesh axis
    that splits it, outer axis first; segments name a strided shard."""
    by_dim = {}
    for axis, dim, segments in shards:
        by_dim.setdefault(dim, []).append((axis, segments))
    for dim, axes in by_dim.items():
        index, count = _place(tuple(a for a, _ in axes), coords)
        segments = axes[0][1]
        whole = StridedShard(dim, segments).piece(whole, count, index) if segments \
            else whole.chunk(count, dim)[index]
    return whole


def _draws_fused(x: torch.Tensor, p: float) -> bool:
    """Whether torch's dropout takes its fused kernel here (at::dropout's own test)."""
    return x.device.type not in ("cpu", "meta") and 0 < p < 1 and x.numel() > 0


@rank_aware
def dropout_piece(input, p=0.5, training=True, inplace=False, *, shape: tuple, shards: tuple,
                  coords=None):
    """``F.dropout`` of this rank's piece of a value split over ``shards``, with this
    piece's part of the mask one device would draw for the whole value: every rank draws
    that whole mask (from the same generator state) and keeps its piece, so the split
    program drops exactly the elements one device drops."""
    if not training or p == 0:
        return input.clone() if inplace else input
    if p == 1:
        return input * torch.zeros((), dtype=input.dtype, device=input.device)
    whole = torch.ones(shape, dtype=input.dtype, device=input.device)
    if _draws_fused(input, p):
        noise = torch.native_dropout(whole, p, True)[0]   # ones * mask / (1 - p)
    else:  # at::dropout's CPU path: bernoulli_ on an empty tensor, then / (1 - p)
        noise = whole.bernoulli_(1 - p).div_(1 - p)
    return input * _piece(noise, shards, coords)


@rank_aware
def random_like_piece(input, *, op: str, shape: tuple, shards: tuple, coords=None, **kwargs):
    """``rand_like`` or ``randn_like`` of this rank's piece: its piece of the whole draw."""
    draw = torch.rand if op == "rand_like" else torch.randn
    kwargs.setdefault("dtype", input.dtype)
    kwargs.setdefault("device", input.device)
    kwargs.pop("memory_format", None)
    return _piece(draw(shape, **kwargs), shards, coords).contiguous()


@rank_aware
def attention_query_rows(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                         scale=None, *, axes: tuple, coords=None, **kwargs):
    """``scaled_dot_product_attention`` of this rank's rows of the queries (their sequence
    split over ``axes``) against the whole keys and values: ``is_causal``'s mask becomes
    these rows of one device's mask (query ``i`` of the whole sees keys ``0..i``)."""
    if is_causal:
        index, _ = _place(axes, coords)
        rows, cols = query.shape[-2], key.shape[-2]
        attn_mask = torch.ones(rows, cols, dtype=torch.bool, device=query.device).tril(
            diagonal=index * rows)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=False,
        scale=scale, **kwargs)
