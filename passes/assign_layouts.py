"""assign_layouts: choose the mesh and a strategy for every node; build the Plan."""

from __future__ import annotations

from autopar.cost import Training
from autopar.graph_utils import module_path
from autopar.planner import choose_plan
from autopar.plans import Plan


def assign_layouts(gm, ctx):
    """Plan with the cost model: every candidate mesh, every node's strategy.

    Reads ``node.meta["val"]`` and ``"autopar.op"``; writes ``"autopar.strategy"`` and
    ``"autopar.layout"``; sets ``ctx.mesh`` and ``ctx.plan``.
    """
    training = Training(ctx.precision, ctx.optimizer)
    budget = ctx.memory_budget_bytes
    if budget is None:
        budget = min(d.memory_bytes for d in ctx.cluster.devices())
    mesh, prob, choice, cost = choose_plan(gm, ctx.cluster, ctx.mesh_request, ctx.constraints,
                                           training, budget, ctx.level, ctx.stats,
                                           ctx.input_names,
                                           getattr(ctx, "blocks", []) if ctx.fold else [])
    ctx.mesh = mesh
    comm = {n: 0.0 for n in prob.nodes}
    for e in prob.edges:  # an edge's collectives are charged to its reader (outputs: writer)
        t = e.cost[(e.src_keys[choice[e.src]], e.dst_keys[choice.get(e.dst, 0)])]
        comm[e.dst if e.dst in comm else e.src] += t
    placements, inputs, nodes = {}, {}, {}
    names = iter(ctx.input_names)
    for n in prob.nodes:
        s = prob.options[n][choice[n]]
        n.meta["autopar.strategy"] = s
        n.meta["autopar.layout"] = s.output
        if n.op == "get_attr":
            placements[n.target] = s.output
        elif n.op == "placeholder":
            inputs[next(names, n.name)] = s.output
        else:
            c = choice[n]
            nodes[n.name] = {"op": n.meta["autopar.op"], "inputs": list(s.inputs),
                             "output": s.output, "module": module_path(n),
                             "compute_s": prob.node_s[n][c], "comm_s": comm[n],
                             "memory_bytes": prob.saved_bytes[n][c]}
    ctx.plan = Plan(mesh=mesh.as_dict(), placements=placements, inputs=inputs, nodes=nodes,
                    cost=cost, stats=ctx.stats, cluster=str(ctx.cluster))
    return gm
