"""Simulated execution: every rank of a mesh inside one process.

A value is a list of per-rank tensors. Ordinary ops run once per rank on that rank's tensors;
each collective of :mod:`autopar.runtime.collectives` is replaced by one autograd Function over
the whole list, with the same forward and backward as the real one, so ``loss.backward()`` and
an optimizer step exercise exactly the gradient flow of the distributed program.
"""

from __future__ import annotations

import torch
from torch.fx import Node
from torch.utils._pytree import tree_map

from ..graph_utils import fetch_attr
from ..mesh import Mesh
from . import collectives as C

RANDOM_OPS = {"dropout", "rand_like", "randn_like", "rand", "randn", "randint", "bernoulli",
              "dropout1d", "dropout2d", "alpha_dropout", "feature_alpha_dropout"}


def _groups(mesh: Mesh, axis: str):
    return mesh.groups(mesh.names.index(axis))


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
}


class _OverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, mesh, args, *xs):
        ctx.fn, ctx.mesh, ctx.args = fn, mesh, args
        ctx.shapes = [(x.shape, x.dtype, x.device) for x in xs]
        return tuple(_SIM[fn][0](list(xs), mesh, *args))

    @staticmethod
    def backward(ctx, *gs):
        gs = [torch.zeros(s, dtype=d, device=dev) if g is None else g
              for g, (s, d, dev) in zip(gs, ctx.shapes)]
        return (None, None, None, *_SIM[ctx.fn][1](gs, ctx.mesh, *ctx.args))


def run_collective(fn, per_rank, mesh: Mesh, args) -> list:
    """Apply collective ``fn`` (one of :data:`collectives.COLLECTIVES`) to per-rank values."""
    if not per_rank[0].is_floating_point():
        with torch.no_grad():
            return _SIM[fn][0](list(per_rank), mesh, *args)
    return list(_OverRanks.apply(fn, mesh, tuple(args), *per_rank))


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
    graph = gms[0].graph
    n = len(gms)
    env: dict = {}
    inputs = iter(inputs)

    def per_rank(a, r):
        return tree_map(lambda v: env[v][r] if isinstance(v, Node) else v, a)

    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = per_rank_copies(next(inputs), n)
        elif node.op == "get_attr":
            env[node] = [fetch_attr(gm, node.target) for gm in gms]
        elif node.op == "call_function" and node.target in _SIM:
            src = env[node.args[0]]
            env[node] = run_collective(node.target, src, mesh, node.args[1:])
        elif node.op in ("call_function", "call_method"):
            random = node.meta.get("autopar.op") in RANDOM_OPS
            state = torch.get_rng_state() if random else None
            outs = []
            aware = getattr(node.target, "rank_aware", False)
            for r in range(n):
                if random:
                    torch.set_rng_state(state)
                args, kwargs = per_rank(node.args, r), per_rank(node.kwargs, r)
                if aware:  # reads the rank's place on the mesh (runtime.local_ops)
                    kwargs = dict(kwargs, coords={
                        a: (c, s) for a, c, s in zip(mesh.names, mesh.coordinate(r),
                                                     mesh.shape)})
                if node.op == "call_function":
                    outs.append(node.target(*args, **kwargs))
                else:
                    outs.append(getattr(args[0], node.target)(*args[1:], **kwargs))
            env[node] = outs
        elif node.op == "output":
            return [per_rank(node.args[0], r) for r in range(n)]
        else:
            raise RuntimeError(f"simulated run cannot execute node {node.format_node()}")
    raise RuntimeError("graph has no output node")
