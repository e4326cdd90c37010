"""assign_layouts: choose the mesh and a strategy for every node; build the Plan."""

from __future__ import annotations

from autopar import search
from autopar.program.graph import module_path
from autopar.rules import tensor_inputs
from autopar.rules.traits import CARRY_LAYOUT
from autopar.search.folding import PLANNED
from autopar.search.result import Plan, Use


def assign_layouts(gm, ctx):
    """Plan with the cost model: every candidate mesh, every node's strategy.

    Reads ``node.meta["val"]`` and ``"autopar.op"``; writes ``"autopar.strategy"`` and
    ``"autopar.layout"``; sets ``ctx.mesh`` and ``ctx.plan``.
    """
    options = ctx.options
    planned = search.plan_program(gm, ctx.cluster, options, ctx.stats, ctx.input_names,
                                  getattr(ctx, "blocks", []))
    mesh, prob, choice, cost, recompute = planned[:5]
    ctx.stats["optimality"] = planned.optimality.report(cost.total_s)
    ctx.mesh = mesh
    comm = _comm_per_node(gm, prob, choice)
    placements, inputs, nodes = {}, {}, {}
    names = iter(ctx.input_names)
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "get_attr", "call_function", "call_method"):
            continue
        s = prob.strategy(choice, n)
        n.meta["autopar.strategy"] = s
        n.meta["autopar.layout"] = s.output
        if n.op == "get_attr":
            placements[n.target] = s.output
        elif n.op == "placeholder":
            inputs[next(names, n.name)] = s.output
        else:
            r = prob.rep.get(n, n)
            c = choice[r]
            nodes[n.name] = {"op": n.meta["autopar.op"], "inputs": list(s.inputs),
                             "output": s.output, "module": module_path(n),
                             "compute_s": prob.node_s[r][c], "comm_s": comm.get(n, 0.0),
                             "memory_bytes": prob.saved_bytes[r][c]}
    ctx.plan = Plan(mesh=mesh.as_dict(), placements=placements, inputs=inputs, nodes=nodes,
                    cost=cost, stats=ctx.stats, cluster=str(ctx.cluster), recompute=recompute,
                    micro_batches=options.micro_batches or 1, uses=_uses(gm),
                    pinned=_pinned(options, [*placements, *inputs]))
    return gm


def carry_plan(source_gm, source_ctx, gm, ctx) -> bool:
    """Give ``gm`` the plan ``source_ctx`` holds of ``source_gm``, the same program under
    other names (:func:`~passes.fold_repeated_blocks.program_key` equal): node by node in
    graph order, its blocks (``ctx.blocks``, found by folding each) instance by instance.
    Sets ``ctx.mesh`` and ``ctx.plan`` as :func:`assign_layouts` would; False (and nothing
    set) where the blocks found in the two differ."""
    mine, theirs = getattr(ctx, "blocks", []), getattr(source_ctx, "blocks", [])
    if [len(c.instances) for c in mine] != [len(c.instances) for c in theirs]:
        return False
    paths = {a.path: b.path for c, d in zip(theirs, mine)
             for a, b in zip(c.instances, d.instances)}
    pairs = list(zip((n for n in source_gm.graph.nodes if n.op in PLANNED),
                     (n for n in gm.graph.nodes if n.op in PLANNED)))
    for a, b in pairs:
        for key in ("autopar.strategy", "autopar.layout"):
            if key in a.meta:
                b.meta[key] = a.meta[key]
    plan = source_ctx.plan
    targets = {a.target: b.target for a, b in pairs if a.op == "get_attr"}
    inputs = dict(zip(source_ctx.input_names, ctx.input_names))
    nodes = {b.name: {**plan.nodes[a.name], "module": module_path(b)}
             for a, b in pairs if a.name in plan.nodes}
    placements = {targets[k]: v for k, v in plan.placements.items()}
    ctx.mesh = source_ctx.mesh
    ctx.plan = Plan(mesh=dict(plan.mesh), placements=placements,
                    inputs={inputs[k]: v for k, v in plan.inputs.items()}, nodes=nodes,
                    cost=plan.cost, stats=ctx.stats, cluster=str(ctx.cluster),
                    recompute={paths.get(k, k): v for k, v in plan.recompute.items()},
                    micro_batches=plan.micro_batches,
                    uses={targets[k]: list(v) for k, v in plan.uses.items()},
                    pinned=_pinned(ctx.options, [*placements, *inputs.values()]))
    return True


def _pinned(options, names) -> dict:
    """What the user pinned of each of ``names`` (parameters and inputs), where anything."""
    return {name: options.pinned(name) for name in names if options.pinned(name)}


def _uses(gm) -> dict:
    """Per parameter FQN, how its readers take it: one :class:`~autopar.search.result.Use` per
    distinct (op, layout read, the op's output layout), following views and casts to the
    op that computes with it."""
    out = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr" or "autopar.strategy" not in n.meta:
            continue
        found = []
        for reader, layout in _readers(n):
            use = Use(reader.meta["autopar.op"], layout, reader.meta["autopar.layout"],
                      len(n.meta["val"].shape))
            if use not in found:
                found.append(use)
        out[n.target] = found
    return out


def _readers(value, read_as=None) -> list:
    """(op computing with ``value``, the layout the parameter is read in) for each reader of
    ``value``, through views and casts (``read_as``: how the parameter was read before
    them)."""
    out = []
    for user in value.users:
        ins = tensor_inputs(user) if "autopar.strategy" in user.meta else []
        if value not in ins:
            continue
        layout = read_as or user.meta["autopar.strategy"].inputs[ins.index(value)]
        deeper = _readers(user, layout) if user.meta["autopar.op"] in CARRY_LAYOUT and \
            len(ins) == 1 else []
        out += deeper or [(user, layout)]
    return out


def _comm_per_node(gm, prob, choice) -> dict:
    """Seconds of collectives per node of the program: an edge's are charged to its reader
    (an output's to its writer); every instance of a folded block pays its own."""
    edges = {(e.src, e.dst, e.slot): e for e in prob.edges}
    comm = {}
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method"):
            dst = prob.rep.get(n, n)
            for slot, src in enumerate(tensor_inputs(n)):
                e = edges[(prob.rep.get(src, src), dst, slot)]
                comm[n] = comm.get(n, 0.0) + e.seconds(choice[e.src], choice[dst]) / e.weight
        elif n.op == "output":
            for e in prob.edges:
                if e.dst is n:
                    comm[e.src] = comm.get(e.src, 0.0) + e.seconds(choice[e.src], 0)
    return comm
