"""Local computations that depend on the rank's place on the mesh.

An op rule names one of these by its name here (``OpSpec.local``) for layouts whose local work
is not the op itself on the local pieces. Each takes the axes it depends on; it reads this rank's
coordinates from the active DeviceMesh, or, in a simulated run (all ranks in one process),
from ``coords`` (axis name -> (coordinate, size)), which the simulator passes.
"""

from __future__ import annotations

import functools
import inspect

import torch

from ..program.placement import StridedShard
from .halo import conv_rows, halo_rows, simulated_halo_rows


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
    y = _experts_of(x[start:stop], w, offs, index, start)
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
def bernoulli_piece(input, p=0.5, *, shape: tuple, shards: tuple, coords=None, generator=None):
    """``x.bernoulli(p)`` of this rank's piece (a mask drawn as ``new_empty(...).bernoulli_(p)``,
    as stochastic depth draws it): its piece of the draw one device makes for the whole."""
    whole = torch.empty(shape, dtype=input.dtype, device=input.device)
    return _piece(whole.bernoulli_(p, generator=generator), shards, coords).contiguous()


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


def _routes(offs: list, rows: int, ranks: int) -> tuple:
    """For rows sorted by expert (``offs``: each expert's cumulative row end) split into
    ``ranks`` equal runs, the experts split as evenly: (the runs' bounds, the bounds of each
    rank's experts' rows), each a list of ``ranks + 1`` row indices."""
    per = len(offs) // ranks
    runs = [rows * r // ranks for r in range(ranks + 1)]
    owned = [0] + [offs[(r + 1) * per - 1] for r in range(ranks - 1)] + [rows]
    return runs, owned


def _overlap(a: int, b: int, c: int, d: int) -> int:
    return max(0, min(b, d) - max(a, c))


def _splits(offs, rows: int, axis: str) -> tuple:
    """(rows this rank sends to each rank, rows it receives from each) when the whole
    layer's ``rows`` rows, sorted by expert (``offs``), travel from the ranks holding them
    in even runs to the ranks holding their experts."""
    r, n = _place((axis,), None)
    runs, owned = _routes(offs.tolist(), rows, n)
    send = [_overlap(runs[r], runs[r + 1], owned[k], owned[k + 1]) for k in range(n)]
    recv = [_overlap(runs[j], runs[j + 1], owned[r], owned[r + 1]) for j in range(n)]
    return send, recv


def _all_to_all(x, out_splits: list, in_splits: list, axis: str):
    from .._torch import functional_collectives
    from .collectives import _group
    return functional_collectives().all_to_all_single_autograd(
        x.contiguous(), out_splits, in_splits, _group(axis))


def expert_dispatch(input, offs, *, axis: str, rows: int):
    """Expert parallel with dispatch, step 1 of 3: this rank's run of the rows (sorted by
    expert, ``rows`` in the whole layer, split evenly over ``axis``) goes out, each row to
    the rank holding its expert (all_to_all); what arrives is every row of this rank's
    experts, in order."""
    send, recv = _splits(offs, rows, axis)
    return _all_to_all(input, recv, send, axis)


@rank_aware
def expert_matmul(input, weight, offs, *, axis: str, rows: int, coords=None):
    """Step 2 of 3: this rank's experts (``weight``) over their rows, every one of them
    (no capacity drop)."""
    r, n = _place((axis,), coords)
    _, owned = _routes(offs.tolist(), rows, n)
    return _experts_of(input, weight, offs, r, owned[r])


def expert_combine(input, offs, *, axis: str, rows: int):
    """Step 3 of 3: each result goes back to the rank its row came from (all_to_all), so
    the output is split as the rows were."""
    send, recv = _splits(offs, rows, axis)
    return _all_to_all(input, send, recv, axis)


def _experts_of(rows, w, offs, rank: int, start: int):
    """``w``'s experts (those of ``rank``) over their rows, which begin at global row
    ``start`` (``offs``: every expert's cumulative row end)."""
    per = w.shape[0]
    local = offs[rank * per:(rank + 1) * per] - start
    return torch.ops.transformers.grouped_mm_fallback(rows, w, local.to(offs.dtype))


def _named(fn, args, kwargs) -> dict:
    return inspect.signature(fn).bind_partial(*args, **kwargs).arguments


def simulated_exchange(fn, per_rank_args: list, groups: list) -> list:
    """A local op of :data:`EXCHANGES` over every rank's values at once (a simulated run):
    ``per_rank_args`` holds each rank's ``(args, kwargs)``, ``groups`` the ranks along the
    axis, in coordinate order."""
    named = [_named(fn, args, kwargs) for args, kwargs in per_rank_args]
    return EXCHANGES[fn](named, groups)


def _simulated_routes(named: list, groups: list, dispatch: bool) -> list:
    """:func:`expert_dispatch` (or, without ``dispatch``, :func:`expert_combine`) in plain
    differentiable ops: the rows of each group joined, then cut as the ranks receive them."""
    out = [None] * len(named)
    for group in groups:
        first = named[group[0]]
        runs, owned = _routes(first["offs"].tolist(), first["rows"], len(group))
        cut_in, cut_out = (runs, owned) if dispatch else (owned, runs)
        whole = torch.cat([named[r]["input"] for r in group])
        for c, rank in enumerate(group):
            out[rank] = whole[cut_out[c] - cut_in[0]:cut_out[c + 1] - cut_in[0]]
    return out


# local ops that exchange values between the ranks of an axis, each with its simulation
# across ranks: (each rank's arguments by name, the groups along the axis) -> per-rank values
EXCHANGES = {expert_dispatch: functools.partial(_simulated_routes, dispatch=True),
             expert_combine: functools.partial(_simulated_routes, dispatch=False),
             halo_rows: simulated_halo_rows}
# a local op that is several steps, by name: the names of the op's arguments, then each
# step's function and the arguments it takes (by name; "input" is the step before's output
# after the first step); each step gets the extra keywords of the op's rule it names
STEPS = {"grouped_mm_dispatch": (("input", "weight", "offs"),
                                 ((expert_dispatch, ("input", "offs")),
                                  (expert_matmul, ("input", "weight", "offs")),
                                  (expert_combine, ("input", "offs")))),
         "conv_halo": (("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                       ((halo_rows, ("input",)),
                        (conv_rows, ("input", "weight", "bias"))))}
