"""assign_layouts: choose the mesh and a strategy for every node; build the Plan."""

from __future__ import annotations

from autopar.errors import PlanError
from autopar.plans import Plan
from autopar.planner import (Pricer, choose_mesh, estimate_cost, input_layout, propagate,
                             resolve_constraints)
from autopar.placement import Shard, replicated
from autopar.rules import shape_of


def assign_layouts(gm, ctx):
    """Pick the mesh, pin constrained parameters, lay out inputs, and propagate.

    Reads ``node.meta["val"]``, ``"autopar.op"``; writes ``"autopar.strategy"`` and
    ``"autopar.layout"``; sets ``ctx.mesh`` and ``ctx.plan``.
    """
    mesh = choose_mesh(ctx.cluster, ctx.mesh_request)
    ctx.mesh = mesh
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr"]
    shapes = {n.target: shape_of(n) for n in attrs}
    pinned = resolve_constraints(ctx.constraints, list(shapes), shapes, mesh)
    split_axes = {a for layout in pinned.values() for a, p in enumerate(layout)
                  if isinstance(p, Shard)}
    free_axes = [a for a in range(mesh.ndim) if a not in split_axes]
    fixed, inputs = {}, {}
    names = iter(ctx.input_names)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            fixed[node] = pinned.get(node.target, replicated(mesh.ndim))
        elif node.op == "placeholder":
            fixed[node] = input_layout(shape_of(node), free_axes, mesh)
            inputs[next(names, node.name)] = fixed[node]
    pricer = Pricer(ctx.cluster, mesh)
    chosen = propagate(gm, mesh, fixed, pricer)
    ctx.plan = Plan(
        mesh=mesh.as_dict(),
        placements={n.target: fixed[n] for n in attrs},
        inputs=inputs,
        nodes={n.name: {"op": n.meta["autopar.op"], "inputs": list(s.inputs),
                        "output": s.output} for n, s in chosen.items()},
        cost=estimate_cost(gm, chosen, pricer),
        stats=ctx.stats,
        cluster=str(ctx.cluster),
    )
    _check_memory(ctx.plan.cost.memory_bytes_per_device, ctx)
    return gm


def _check_memory(need: float, ctx):
    budget = ctx.memory_budget_bytes
    if budget is None:
        budget = min(d.memory_bytes for d in ctx.cluster.devices())
    if need > budget:
        raise PlanError(f"parameters and gradients need {need / 2**30:.2f} GiB per device but "
                        f"the budget is {budget / 2**30:.2f} GiB on {ctx.cluster}; shard large "
                        "parameters with constraints=, add devices, or raise "
                        "memory_budget_bytes")
