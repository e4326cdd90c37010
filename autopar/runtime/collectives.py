"""The collective ops a rank program calls, for real processes (torch.distributed).

Each op is a plain function named in the generated code (``all_gather(x, 0, 'tp')``) whose
forward and backward follow the table in :mod:`autopar.program.redistribute`; the communication is
``torch.distributed._functional_collectives`` on the active mesh's sub-groups. In simulated
mode the same functions are never called: :mod:`autopar.runtime.simulate` runs every rank
together and replaces each by an op over the list of per-rank values.
"""

from __future__ import annotations

import torch

from .._torch import functional_collectives
from ..program.placement import StridedShard
from . import faults

# torch.distributed._functional_collectives is the traceable collective API (private, but the
# one torch.compile understands). Checked against torch 2.5 through 2.13: the *_single names
# replaced all_gather_tensor / reduce_scatter_tensor in 2.13, which still accepts the old ones.
funcol = functional_collectives()
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor

_ACTIVE = {"mesh": None}


def set_active_mesh(mesh) -> None:
    """The DeviceMesh the collectives of rank programs in this process run over."""
    _ACTIVE["mesh"] = mesh


def _group(axis: str):
    mesh = _ACTIVE["mesh"]
    if mesh is None:
        raise RuntimeError("no device mesh is active: run rank programs through their "
                           "ParallelModule, which sets it up")
    return (mesh, mesh.mesh_dim_names.index(axis))


def _size(axis: str) -> int:
    mesh, i = _group(axis)
    return mesh.size(i)


def _coord(axis: str) -> int:
    mesh, i = _group(axis)
    return mesh.get_local_rank(i)


def _wait(t):
    return funcol.wait_tensor(t) if isinstance(t, funcol.AsyncCollectiveTensor) else t


def _gather(x, dim, axis):
    return _wait(_all_gather(x.contiguous(), dim, _group(axis)))


def _reduce(x, axis):
    return _wait(funcol.all_reduce(x.contiguous(), "sum", _group(axis)))


def _scatter(x, dim, axis):
    return _wait(_reduce_scatter(x.contiguous(), "sum", dim, _group(axis)))


def _slice(x, dim, axis):
    """This rank's piece of ``x``, in storage of its own: a view would keep the whole of
    ``x`` alive as long as the piece (a gradient kept in ``.grad``, an activation saved for
    backward)."""
    n = _size(axis)
    piece = x.chunk(n, dim)[_coord(axis)]
    return piece.clone(memory_format=torch.contiguous_format) if n > 1 else piece.contiguous()


def _exchange(x, split_dim, cat_dim, axis):
    """All-to-all: this rank's pieces of ``x`` along ``split_dim`` go one to each rank, and
    the pieces received join along ``cat_dim``. The packed send buffer is freed before the
    pieces join, so that at most two copies of the value are alive beside ``x``."""
    n = _size(axis)
    chunks = torch.stack([c.contiguous() for c in x.chunk(n, split_dim)])
    shape = chunks.shape
    out = _wait(funcol.all_to_all_single(chunks.reshape(n, -1), None, None, _group(axis)))
    del chunks
    return torch.cat(out.reshape(shape).unbind(0), cat_dim)


def _strided_gather(x, dim, segments, axis):
    """S(dim)*segments -> R: the pieces gathered, then put back in segment order."""
    n = _size(axis)
    whole = _gather(x, dim, axis)
    return StridedShard(dim, segments).join(whole.chunk(n, dim))


def _strided_slice(x, dim, segments, axis):
    """R -> S(dim)*segments: this rank's piece of every segment, in storage of its own."""
    return StridedShard(dim, segments).piece(x, _size(axis), _coord(axis)).contiguous()


def _strided_scatter(x, dim, segments, axis):
    """P -> S(dim)*segments: the sum reordered rank by rank, then reduce-scattered."""
    return _scatter(StridedShard(dim, segments).rank_major(x, _size(axis)), dim, axis)


def _identity(x, *args):
    return x.view_as(x)


def _keep_first(x, axis):
    return x.clone() if _coord(axis) == 0 else torch.zeros_like(x)


def _function(name: str, forward, backward):
    """An autograd Function whose forward and backward are ``forward(x, *args)`` and
    ``backward(grad, *args)``, from the redistribution table; ``apply(x, args)`` takes the
    non-tensor arguments as one tuple. Dynamo (checked with torch 2.13) drops ``ctx`` when it
    inlines a ``forward(ctx, x, *args)`` none of whose inputs needs a gradient, and breaks
    the graph there; a fixed signature keeps a rank program one graph under torch.compile."""

    def fwd(ctx, x, args):
        ctx.args = args
        return forward(x, *args)

    def bwd(ctx, g):
        if torch.compiler.is_compiling():
            return backward(g, *ctx.args), None
        try:
            return backward(g, *ctx.args), None
        except Exception as error:  # a peer's failure becomes RankFailed, not gloo's timeout
            raise faults.explain(error, "in backward")  # noqa: B904 - explain chains it

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


# op -> (forward, backward); all_to_all's arguments are (gather_dim, split_dim, axis)
_AllGather = _function("_AllGather", _gather, _slice)
_Shard = _function("_Shard", _slice, _gather)
_AllReduce = _function("_AllReduce", _reduce, _identity)
_ReduceScatter = _function("_ReduceScatter", _scatter, _gather)
_AllToAll = _function("_AllToAll", lambda x, gd, sd, a: _exchange(x, sd, gd, a),
                      lambda g, gd, sd, a: _exchange(g, gd, sd, a))
_GatherShards = _function("_GatherShards", _gather, _scatter)
_ToPartial = _function("_ToPartial", _keep_first, _identity)
_GradSum = _function("_GradSum", _identity, _reduce)
_StridedGather = _function("_StridedGather", _strided_gather, _strided_slice)
_StridedShard = _function("_StridedShard", _strided_slice, _strided_gather)
_StridedScatter = _function("_StridedScatter", _strided_scatter, _strided_gather)


def all_gather(x, dim: int, axis: str):
    """S(dim) -> R on ``axis``; backward takes this rank's slice of the gradient."""
    return _AllGather.apply(x, (dim, axis))


def shard(x, dim: int, axis: str):
    """R -> S(dim) on ``axis``: keep this rank's slice; backward all-gathers the gradient."""
    return _Shard.apply(x, (dim, axis))


def all_reduce(x, axis: str):
    """P -> R on ``axis``; backward is the identity."""
    return _AllReduce.apply(x, (axis,))


def reduce_scatter(x, dim: int, axis: str):
    """P -> S(dim) on ``axis``; backward all-gathers the gradient."""
    return _ReduceScatter.apply(x, (dim, axis))


def all_to_all(x, gather_dim: int, split_dim: int, axis: str):
    """S(gather_dim) -> S(split_dim) on ``axis``; backward exchanges back."""
    return _AllToAll.apply(x, (gather_dim, split_dim, axis))


def gather_shards(x, dim: int, axis: str):
    """S(dim) -> R on ``axis`` for a value whose gradient is then summed over ``axis``
    (a parameter stored sharded, gathered for use): backward reduce-scatters the gradient,
    which is all_gather's slice and the gradient sum fused into one collective."""
    return _GatherShards.apply(x, (dim, axis))


def to_partial(x, axis: str):
    """R -> P on ``axis``: coordinate 0 keeps the value, the others hold zeros."""
    return _ToPartial.apply(x, (axis,))


def grad_sum(x, axis: str):
    """Identity forward; backward all-reduces the gradient over ``axis`` (Megatron's f):
    a replicated value feeding work split over ``axis`` gets only part of its gradient."""
    return _GradSum.apply(x, (axis,))


def strided_gather(x, dim: int, segments: tuple, axis: str):
    """S(dim)*segments -> R on ``axis``; backward takes this rank's strided piece."""
    return _StridedGather.apply(x, (dim, segments, axis))


def strided_shard(x, dim: int, segments: tuple, axis: str):
    """R -> S(dim)*segments on ``axis``; backward gathers the gradient's pieces back."""
    return _StridedShard.apply(x, (dim, segments, axis))


def strided_reduce_scatter(x, dim: int, segments: tuple, axis: str):
    """P -> S(dim)*segments on ``axis``; backward gathers the gradient's pieces back."""
    return _StridedScatter.apply(x, (dim, segments, axis))


COLLECTIVES = {all_gather, shard, all_reduce, reduce_scatter, all_to_all, to_partial, grad_sum,
               gather_shards, strided_gather, strided_shard, strided_reduce_scatter}
STEP_FUNCTIONS = {"all_gather": all_gather, "shard": shard, "all_reduce": all_reduce,
                  "reduce_scatter": reduce_scatter, "all_to_all": all_to_all,
                  "to_partial": to_partial}
STRIDED_FUNCTIONS = {"all_gather": strided_gather, "shard": strided_shard,
                     "reduce_scatter": strided_reduce_scatter}


def step_call(step, axis_names):
    """(function, extra args) that carry out a :class:`~autopar.program.redistribute.Step`."""
    axis = axis_names[step.axis]
    if step.segments:
        return STRIDED_FUNCTIONS[step.kind], (step.dim, step.segments, axis)
    fn = STEP_FUNCTIONS[step.kind]
    if step.kind in ("all_reduce", "to_partial"):
        return fn, (axis,)
    if step.kind == "all_to_all":
        return fn, (step.dim, step.dim2, axis)
    return fn, (step.dim, axis)
