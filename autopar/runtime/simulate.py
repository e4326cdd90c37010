"""Simulated execution: every rank of a mesh inside one process.

A value is a list of per-rank tensors. Ordinary ops run once per rank on that rank's tensors;
each collective of :mod:`autopar.runtime.collectives` is replaced by one differentiable op
over the whole list (:func:`simulated_collective`), with the same forward and backward as the
real one, so ``loss.backward()`` and an optimizer step exercise exactly the gradient flow of
the distributed program.

A block the plan recomputes (:mod:`autopar.runtime.checkpoint`) runs as one
``torch.utils.checkpoint`` over every rank's tensors at once, with the policy of the real run.

Randomness: an op that draws (dropout) runs every rank from the same generator state, which
then stands where one draw leaves it, so replicated regions draw one device's numbers and a
recomputed block, whose checkpoint restores the state it started from, draws them again.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from .._torch import tree_map
from ..program.graph import fetch_attr
from ..program.mesh import Mesh
from ..program.placement import StridedShard
from . import collectives as C
from . import local_ops
from .checkpoint import Recomputed, run_checkpointed

RANDOM_OPS = {"dropout", "rand_like", "randn_like", "rand", "randn", "randint", "bernoulli",
              "dropout1d", "dropout2d", "alpha_dropout", "feature_alpha_dropout"}
# ops that draw only with a positive dropout_p: (op, position of dropout_p)
DROPOUT_ARG = {"scaled_dot_product_attention": 4}


def draws_random(node: Node) -> bool:
    """Whether running ``node`` draws from the random generator."""
    op = node.meta.get("autopar.op")
    if op in RANDOM_OPS:
        return True
    if op in DROPOUT_ARG:
        i = DROPOUT_ARG[op]
        p = node.kwargs.get("dropout_p", node.args[i] if len(node.args) > i else 0.0)
        return not isinstance(p, (int, float)) or p > 0
    return False


def _groups(mesh: Mesh, axis):
    return mesh.groups(mesh.axis_index(axis))


def _sim_all_gather(xs, mesh, dim, axis):
    out = [None] * len(xs)
    for g in _groups(mesh, axis):
        full = torch.cat([xs[r] for r in g], dim)
        for r in g:
            out[r] = full.clone()
    return out


def _sim_slice(xs, mesh, dim, axis):
    out = [None] * len(xs)
    for g in _groups(mesh, axis):
        for c, r in enumerate(g):
            out[r] = xs[r].chunk(len(g), dim)[c].clone()
    return out


def _sim_sum(xs, mesh, axis):
    out = [None] * len(xs)
    for g in _groups(mesh, axis):
        total = sum(xs[r] for r in g)
        for r in g:
            out[r] = total.clone()
    return out


def _sim_scatter(xs, mesh, dim, axis):
    out = [None] * len(xs)
    for g in _groups(mesh, axis):
        total = sum(xs[r] for r in g)
        for c, r in enumerate(g):
            out[r] = total.chunk(len(g), dim)[c].clone()
    return out


def _sim_exchange(xs, mesh, split_dim, cat_dim, axis):
    out = [None] * len(xs)
    for g in _groups(mesh, axis):
        for c, r in enumerate(g):
            out[r] = torch.cat([xs[k].chunk(len(g), split_dim)[c] for k in g], cat_dim)
    return out


def _sim_keep_first(xs, mesh, axis):
    out = [None] * len(xs)
    for g in _groups(mesh, axis):
        for c, r in enumerate(g):
            out[r] = xs[r].clone() if c == 0 else torch.zeros_like(xs[r])
    return out


def _identity(xs, mesh, *args):
    return [x.clone() for x in xs]


def _strided(xs, mesh, dim, *segments_axis):
    """Per group along the axis: (its ranks, the strided shard)."""
    *segments, axis = segments_axis
    return _groups(mesh, axis), StridedShard(dim, tuple(segments))


def _sim_strided_gather(xs, mesh, *args):
    out = [None] * len(xs)
    groups, p = _strided(xs, mesh, *args)
    for g in groups:
        full = p.join([xs[r] for r in g])
        for r in g:
            out[r] = full.clone()
    return out


def _sim_strided_slice(xs, mesh, *args):
    out = [None] * len(xs)
    groups, p = _strided(xs, mesh, *args)
    for g in groups:
        for c, r in enumerate(g):
            out[r] = p.piece(xs[r], len(g), c).clone()
    return out


def _sim_strided_scatter(xs, mesh, *args):
    out = [None] * len(xs)
    groups, p = _strided(xs, mesh, *args)
    for g in groups:
        total = sum(xs[r] for r in g)
        for c, r in enumerate(g):
            out[r] = p.piece(total, len(g), c).clone()
    return out


# forward and backward of each collective, both over the list of per-rank tensors
_SIM = {
    C.all_gather: (_sim_all_gather, _sim_slice),
    C.shard: (_sim_slice, _sim_all_gather),
    C.all_reduce: (_sim_sum, _identity),
    C.reduce_scatter: (_sim_scatter, _sim_all_gather),
    C.all_to_all: (lambda xs, m, gd, sd, a: _sim_exchange(xs, m, sd, gd, a),
                   lambda gs, m, gd, sd, a: _sim_exchange(gs, m, gd, sd, a)),
    C.to_partial: (_sim_keep_first, _identity),
    C.grad_sum: (_identity, _sim_sum),
    C.gather_shards: (_sim_all_gather, _sim_scatter),
    C.strided_gather: (_sim_strided_gather, _sim_strided_slice),
    C.strided_shard: (_sim_strided_slice, _sim_strided_gather),
    C.strided_reduce_scatter: (_sim_strided_scatter, _sim_strided_gather),
}


_BY_NAME = {fn.__name__: fn for fn in _SIM}


# One collective over every rank's tensors is one op of the dispatcher, as a real one is:
# a selective checkpoint (runtime.checkpoint) sees it whole and keeps its outputs, not the
# temporaries of its simulation, and never runs it again in backward.
@torch.library.custom_op("autopar::simulated_collective", mutates_args=())
def simulated_collective(xs: list[torch.Tensor], name: str, dims: list[int], axis: int,
                         mesh_shape: list[int]) -> list[torch.Tensor]:
    """Collective ``name`` of :mod:`autopar.runtime.collectives` on the per-rank ``xs``, over
    mesh axis number ``axis`` of a mesh of shape ``mesh_shape``."""
    return _SIM[_BY_NAME[name]][0](list(xs), _numbered(mesh_shape), *dims, axis)


def _numbered(shape) -> Mesh:
    """A mesh of ``shape`` whose axes are named by their index (an op takes no names)."""
    return Mesh(tuple(range(len(shape))), tuple(shape))


def _keep_arguments(ctx, inputs, output):
    xs, ctx.name, ctx.dims, ctx.axis, shape = inputs
    ctx.mesh = _numbered(shape)
    ctx.shapes = [(x.shape, x.dtype, x.device) for x in xs]


def _collective_backward(ctx, grads):
    grads = [torch.zeros(s, dtype=d, device=dev) if g is None else g
             for g, (s, d, dev) in zip(grads, ctx.shapes)]
    back = _SIM[_BY_NAME[ctx.name]][1](grads, ctx.mesh, *ctx.dims, ctx.axis)
    # an empty list of ints reads as an (empty) list of tensors: its gradient is one too
    return back, None, [] if not ctx.dims else None, None, None


simulated_collective.register_autograd(_collective_backward, setup_context=_keep_arguments)


def run_collective(fn, per_rank, mesh: Mesh, args) -> list:
    """Apply collective ``fn`` (one of :data:`collectives.COLLECTIVES`) to per-rank values."""
    # a strided shard's segments travel as ints beside its dim
    args = [x for a in args for x in (a if isinstance(a, tuple) else (a,))]
    if not per_rank[0].is_floating_point():
        with torch.no_grad():
            return _SIM[fn][0](list(per_rank), mesh, *args)
    *dims, axis = args
    return simulated_collective(list(per_rank), fn.__name__, [int(d) for d in dims],
                                mesh.names.index(axis), list(mesh.shape))


class _Replicated(torch.autograd.Function):
    """Rank 0's copy of a replicated output; backward hands every rank the same gradient,
    as each process of a real run back-propagates its own copy of the loss."""

    @staticmethod
    def forward(ctx, *xs):
        ctx.n = len(xs)
        return xs[0].clone()

    @staticmethod
    def backward(ctx, g):
        return (g,) * ctx.n


class _PerRankCopies(torch.autograd.Function):
    """One copy of a user input per rank; backward takes rank 0's gradient, which is the whole
    gradient of a replicated value on every rank (as each process of a real run holds its
    own copy of the input)."""

    @staticmethod
    def forward(ctx, x, n):
        return tuple(x.view_as(x) for _ in range(n))

    @staticmethod
    def backward(ctx, *gs):
        return gs[0], None


def per_rank_copies(x, n: int) -> list:
    if isinstance(x, torch.Tensor) and x.requires_grad:
        return list(_PerRankCopies.apply(x, n))
    return [x] * n


def merge_replicated(per_rank: list):
    if isinstance(per_rank[0], torch.Tensor) and per_rank[0].is_floating_point():
        return _Replicated.apply(*per_rank)
    return per_rank[0]


@torch.compiler.disable
def run_replicated(gms: list, mesh: Mesh, inputs: list) -> list:
    """Run every rank and return the graph's outputs as one replicated tensor each (rank 0's
    copy; its gradient goes to every rank).

    Dynamo does not trace into it: under ``torch.compile`` the per-rank interpreter runs as
    written. Traced, the loop over ranks broke into fragments whose gradients came out wrong
    under inductor (torch 2.13: rank 0's parameters got zeros, rank 1's the rest).
    """
    per_rank = run_ranks(gms, mesh, inputs)
    return [merge_replicated([outs[i] for outs in per_rank]) for i in range(len(per_rank[0]))]


def run_ranks(gms: list, mesh: Mesh, inputs: list) -> list:
    """Run the SPMD graph of ``gms`` (one GraphModule per rank, same graph) in lockstep.

    Returns the per-rank values of the graph's (flat tuple) output.
    """
    n = len(gms)
    return _run_graph(gms[0].graph, mesh, n, [per_rank_copies(x, n) for x in inputs],
                      lambda target: [fetch_attr(gm, target) for gm in gms])


def run_recomputed(block: Recomputed, per_rank_args: list, mesh: Mesh) -> list:
    """A recomputed block over every rank: one checkpoint of the block's graph run for all
    ranks. Its arguments go in flat (a tensor each), so the checkpoint saves them as it
    saves a real rank's. Returns the block's output tuple per rank."""
    n = mesh.size
    flat = [v for per_rank in per_rank_args for v in per_rank]

    def over_ranks(*flat):
        lists = [list(flat[i * n:(i + 1) * n]) for i in range(len(per_rank_args))]
        outs = _run_graph(block.graph_module.graph, mesh, n, lists, None)
        return tuple(v for i in range(len(outs[0])) for v in (o[i] for o in outs))

    got = run_checkpointed(over_ranks, block.choice, *flat)
    k = len(got) // n
    return [tuple(got[i * n + r] for i in range(k)) for r in range(n)]


def _run_graph(graph, mesh: Mesh, n: int, inputs: list, attrs) -> list:
    """Interpret ``graph`` for ``n`` ranks: ``inputs`` the per-rank values of its
    placeholders, ``attrs(target)`` those of a get_attr."""
    env: dict = {}
    inputs = iter(inputs)

    def per_rank(a, r):
        return tree_map(lambda v: env[v][r] if isinstance(v, Node) else v, a)

    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = next(inputs)
        elif node.op == "get_attr":
            env[node] = attrs(node.target)
        elif node.op == "call_function" and node.target in _SIM:
            src = env[node.args[0]]
            env[node] = run_collective(node.target, src, mesh, node.args[1:])
        elif node.op == "call_function" and node.target in local_ops.EXCHANGES:
            # rows travel between ranks: one op over every rank's values
            env[node] = local_ops.simulated_exchange(
                node.target, [(per_rank(node.args, r), per_rank(node.kwargs, r))
                              for r in range(n)], _groups(mesh, node.kwargs["axis"]))
        elif node.op == "call_function" and isinstance(node.target, Recomputed):
            env[node] = run_recomputed(node.target, [env[a] for a in node.args], mesh)
        elif node.op in ("call_function", "call_method"):
            env[node] = _run_op(node, n, mesh, per_rank)
        elif node.op == "output":
            return [per_rank(node.args[0], r) for r in range(n)]
        else:
            raise RuntimeError(f"simulated run cannot execute node {node.format_node()}")
    raise RuntimeError("graph has no output node")


def _run_op(node, n: int, mesh: Mesh, per_rank) -> list:
    """An ordinary op on every rank's values; a random one from the same generator state."""
    random = draws_random(node)
    state = torch.get_rng_state() if random else None
    outs = []
    aware = getattr(node.target, "rank_aware", False)
    for r in range(n):
        if random:
            torch.set_rng_state(state)
        args, kwargs = per_rank(node.args, r), per_rank(node.kwargs, r)
        if aware:  # reads the rank's place on the mesh (runtime.local_ops)
            kwargs = dict(kwargs, coords={
                a: (c, s) for a, c, s in zip(mesh.names, mesh.coordinate(r), mesh.shape)})
        if node.op == "call_function":
            outs.append(node.target(*args, **kwargs))
        else:
            outs.append(getattr(args[0], node.target)(*args[1:], **kwargs))
    return outs
