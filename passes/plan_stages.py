"""plan_stages: cut the program of one micro-batch into pipeline stages and plan each stage.

Where the options pin a "pp" mesh axis of p > 1, the devices are cut into p equal groups and
the program's layers (:func:`autopar.program.stages.find_layers`) into p stages (p * v for
interleaved 1F1B). The layers are priced on each kind of group by a plan of the whole program
there (memory unbounded: what each layer costs at its fastest), the search of
:mod:`autopar.search.stages` finds the best cuts and group orders by those prices, and the best
few are planned exactly, stage by stage, each stage's program by ``assign_layouts`` on its own
devices, its budget less the activations of the micro-batches it holds at once. The plan kept
is the fastest played, within memory.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from autopar.errors import NoFit, NotFaster, PlanError
from autopar.options import schedule_chunks
from autopar.program.graph import copy_graph_module
from autopar.program.stages import check_split, cut, find_layers
from autopar.search import stages as S
from autopar.search.recompute import block_paths, resolve_recompute
from autopar.search.result import Plan

from .assign_layouts import assign_layouts, carry_plan
from .fold_repeated_blocks import fold_repeated_blocks, program_key

# A probe's budget: no bound (what each layer costs at its fastest).
_UNBOUNDED = 1e30
# A pipeline whose estimate is slower than the plan to beat by more than this share is not
# planned exactly (the estimate and the exact plan differ by a few percent).
SLOWER_MARGIN = 0.10
# An even split whose estimate is within this share of the best estimate is the only cut
# planned exactly (what an uneven cut would gain is within the estimate's own error).
EVEN_ENOUGH = 0.01


@dataclasses.dataclass
class StagePlanned:
    """One planned stage: its program (``graph``: the cut), pass context (its ``plan``,
    ``mesh``, later ``program``) and ranks."""

    graph: object
    ctx: object
    ranks: range


def plan_stages(gm, ctx):
    """Plan the pinned pipeline; sets ``ctx.plan`` (with ``stages``) and ``ctx.stages``
    (:class:`StagePlanned` per stage, in pipeline order)."""
    options, cluster = ctx.options, ctx.cluster
    p = options.pipeline_stages
    m = options.micro_batches or 1
    layers = find_layers(gm, getattr(ctx, "blocks", []))
    if layers is None:
        raise PlanError(f"mesh={dict(options.mesh)} asks for {p} pipeline stages, but the "
                        "program has no repeated layers to cut between (an nn.ModuleList of "
                        "alike blocks); plan it without the 'pp' axis")
    name, v = schedule_chunks(options.schedule) if options.schedule else (None, 1)
    names = [name] if name else (["1f1b"] if m >= p else ["gpipe"])
    n_stages = p * v
    if n_stages > len(layers):
        raise PlanError(f"{n_stages} pipeline stages (pp={p}"
                        f"{f', {v} chunks per rank' if v > 1 else ''}) but the program has "
                        f"only {len(layers)} layers ({layers.paths[0]} .. {layers.paths[-1]}); "
                        f"use pp <= {len(layers) // v}")
    groups = S.groups_of(cluster, p)
    if groups is None:
        raise PlanError(f"pp={p} does not cut {cluster} into equal groups of whole nodes or "
                        f"equal parts of a node; use a pp that divides "
                        f"{cluster.world_size} so")
    budget = options.memory_budget_bytes
    parts = [cluster.part(g) for g in groups]
    sub_mesh = options.stage_mesh
    d = len(groups[0])
    if sub_mesh is not None and math.prod(sub_mesh.values()) != d:
        raise PlanError(f"mesh={dict(options.mesh)}: each of the {p} stages holds {d} "
                        f"devices, but the axes after 'pp' hold "
                        f"{math.prod(sub_mesh.values())}")
    for order in names:
        S.schedule_orders(order, p, v, m)   # refuses what cannot run
    if options.stages is not None:
        firsts = check_split(layers, _checked_count(options.stages, n_stages))
        candidates = [[firsts]]
    else:
        candidates = None
    prober = _Prober(gm, ctx, layers)
    plans = _StagePlans()
    kinds = [_signature(c) for c in parts]
    orders = S.group_orders(kinds) if options.stages is None else [list(range(p))]
    found = []   # (estimated step, config, mesh)
    even = _even_split(layers, n_stages)
    for sched in names:
        for order in orders:
            mesh = sub_mesh or prober.mesh_for(parts[order[0]], m)
            if candidates is not None:
                found.append((0.0, S.Config(p, v, sched, m, order, candidates[0][0]), mesh))
                continue
            in_flight = _in_flight(sched, p, v, m)

            def prices_of(s, order=order, mesh=mesh):
                return prober.prices(parts[order[s % p]], m, mesh)

            def budget_of(s, order=order):
                return _capacity(parts[order[s % p]], budget)
            ranked = [f for _, f in S.cuts(prices_of, len(layers), n_stages, in_flight,
                                            budget_of, layers.cuttable, m - 1)]
            if order == list(range(p)) and even is not None and even not in ranked:
                ranked.append(even)   # priced beside the best, to be compared exactly
            for firsts in ranked:
                config = S.Config(p, v, sched, m, order, firsts)
                found.append((_estimate(config, prices_of, ctx.cluster, groups, len(layers)),
                              config, mesh))
    found.sort(key=lambda f: f[0])
    bound = getattr(ctx, "stage_bound", math.inf)
    if found and found[0][0] > bound * (1 + SLOWER_MARGIN):
        raise NotFaster(f"no pipeline of {n_stages} stages is predicted faster than "
                        f"{bound:.4g} s a step (the best {found[0][0]:.4g} s)")
    best, errors = None, []
    even_est = _even_estimate(found, even, p) if candidates is None and even is not None \
        else math.inf
    # the even split of rank order is planned exactly beside the best estimate (the plan
    # kept is never predicted slower than it), and alone where it is within EVEN_ENOUGH of
    # the best estimate
    close = found and even_est <= found[0][0] * (1 + EVEN_ENOUGH)
    for _, config, mesh in ([] if close else found[:S.EXACT_CANDIDATES]):
        try:
            best = _plan_config(gm, ctx, layers, config, groups, parts, mesh, budget, plans)
            break
        except NoFit as e:
            errors.append(e)
    if found and even_est <= found[0][0] * (1 + SLOWER_MARGIN) and \
            (best is None or list(best[0].firsts) != even or best[0].groups != list(range(p))):
        config = S.Config(p, v, names[0], m, list(range(p)), even)
        try:
            made = _plan_config(gm, ctx, layers, config, groups, parts,
                                sub_mesh or prober.mesh_for(parts[0], m), budget, plans)
            if best is None or made[0].predicted_s < best[0].predicted_s:
                best = made
        except NoFit as e:
            errors.append(e)
    if best is None and close:   # the even split did not fit: the best estimates then
        for _, config, mesh in found[:S.EXACT_CANDIDATES]:
            try:
                best = _plan_config(gm, ctx, layers, config, groups, parts, mesh, budget, plans)
                break
            except NoFit as e:
                errors.append(e)
    if best is None:
        if errors:
            raise errors[0]
        raise NoFit(_capacity(cluster, budget), cluster,
                    math.inf, note=f"no cut of {len(layers)} layers into {n_stages} stages "
                    "fits each stage's devices")
    config, planned = best
    ctx.stages = planned
    ctx.plan = _pipeline_plan(ctx, config, planned, layers)
    ctx.stats["pipeline"]["stage_plans"] = {"solved": plans.solved, "carried": plans.carried}
    ctx.mesh = None
    return gm


def _estimate(config, prices_of, cluster, groups, n_layers: int) -> float:
    """The step of ``config`` played with the layers' prices (before planning it exactly)."""
    n, p = config.p * config.v, config.p
    bounds = list(config.firsts) + [n_layers]
    fwd, bwd, fixed, transfer = [], [], [0.0] * p, []
    for s in range(n):
        pr = prices_of(s)
        t, once, _ = pr.stage(bounds[s], bounds[s + 1])
        fwd.append(t * (1 - S.BACKWARD_SHARE))
        bwd.append(t * S.BACKWARD_SHARE)
        fixed[s % p] += once
        if s + 1 < n:
            a, b = groups[config.group_of(s)], groups[config.group_of(s + 1)]
            transfer.append(S.transfer_seconds(pr.boundary_bytes[bounds[s + 1]],
                                               S.link_between(cluster, a, b), len(a),
                                               pr.link))
    orders = S.schedule_orders(config.schedule, p, config.v, config.micro_batches)
    return S.play(orders, fwd, bwd, transfer or [0.0], fixed).step_s


def _even_estimate(found, even, p) -> float:
    """The estimate of the even split in rank order among those ``found`` (infinite where
    it is not among them: it does not fit)."""
    return next((est for est, config, _ in found
                 if list(config.firsts) == even and config.groups == list(range(p))),
                math.inf)


def _even_split(layers, n_stages: int) -> list | None:
    """The first layer of each stage when the layers are split as evenly as they go (the
    first stages taking one more); None where the program cannot be cut there."""
    n = len(layers)
    sizes = [n // n_stages + (1 if s < n % n_stages else 0) for s in range(n_stages)]
    firsts = [sum(sizes[:s]) for s in range(n_stages)]
    if any(not layers.cuttable[j] for j in firsts[1:]):
        return None
    return firsts


def _checked_count(split, n_stages: int) -> list:
    if len(split) != n_stages:
        raise PlanError(f"stages={list(split)}: {len(split)} stages given, but the mesh's "
                        f"'pp' axis and schedule make {n_stages}")
    return list(split)


def _in_flight(schedule: str, p: int, v: int, m: int) -> list:
    """Per stage, the micro-batches whose activations it holds at most under ``schedule``."""
    orders = S.schedule_orders(schedule, p, v, m)
    n = p * v
    played = S.play(orders, [1.0] * n, [2.0] * n, [0.0] * max(n - 1, 1))
    return played.in_flight


def _signature(cluster) -> tuple:
    return tuple((n.device.name, n.count) for n in cluster.nodes)


class _Prober:
    """Prices of every layer on a group of devices, one plan of the whole program per
    (kind of group, micro-batches, mesh)."""

    def __init__(self, gm, ctx, layers):
        self.gm, self.ctx, self.layers = gm, ctx, layers
        self.cache = {}

    def _plan(self, cluster, m, mesh):
        key = (_signature(cluster), m, tuple((mesh or {}).items()))
        if key not in self.cache:
            gm = copy_graph_module(self.gm)
            options = self.ctx.options.replace(mesh=mesh, micro_batches=m, stages=None,
                                               schedule=None,
                                               memory_budget_bytes=_UNBOUNDED,
                                               recompute=self.ctx.options.recompute or "none")
            ctx = dataclasses.replace(self.ctx, cluster=cluster, options=options,
                                      stats={"seconds": self.ctx.stats.get("seconds", {})})
            fold_repeated_blocks(gm, ctx)
            assign_layouts(gm, ctx)
            self.cache[key] = (gm, ctx.plan)
        return self.cache[key]

    def mesh_for(self, cluster, m) -> dict:
        """The mesh the whole program is fastest on over ``cluster``'s devices."""
        made = self._plan(cluster, m, None)
        mesh = dict(made[1].mesh)
        self.cache.setdefault((_signature(cluster), m, tuple(mesh.items())), made)
        return mesh

    def prices(self, cluster, m, mesh) -> S.Prices:
        key = ("prices", _signature(cluster), m, tuple((mesh or {}).items()))
        if key not in self.cache:
            gm, plan = self._plan(cluster, m, mesh)
            self.cache[key] = _prices(gm, plan, self.layers, cluster, m, self.ctx.options)
        return self.cache[key]


def _prices(gm, plan, layers, cluster, m, options) -> S.Prices:
    L = len(layers)
    starts = layers.starts
    nodes = list(gm.graph.nodes)

    def layer_at(i):
        j = 0
        while j + 1 < L and starts[j + 1] <= i:
            j += 1
        return j

    step = [0.0] * L
    saved = [0.0] * L
    params = [set() for _ in range(L)]
    for i, n in enumerate(nodes):
        row = plan.nodes.get(n.name)
        if row is not None:
            j = layer_at(i)
            step[j] += row["compute_s"] + row["comm_s"]
            saved[j] += row["memory_bytes"]
        if n.op in ("call_function", "call_method"):
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    params[layer_at(i)].add(a.target)
    training = options.training(m)
    sizes = {n.target: n.meta["val"] for n in nodes if n.op == "get_attr"}
    mesh_sizes = list(plan.mesh.values())
    state = [0.0] * L
    for j in range(L):
        for t in params[j]:
            val = sizes[t]
            layout = plan.placements.get(t, ())
            split = math.prod(mesh_sizes[a] for a, pl in enumerate(layout)
                              if type(pl).__name__ == "Shard")
            state[j] += val.numel() * training.bytes_per_parameter(
                val.requires_grad, val.element_size()) / split
    step = [t / m for t in step]   # a plan's op seconds are its m micro-batches'
    per_micro = sum(step)
    fixed_total = max(plan.cost.total_s - m * per_micro, 0.0)
    total_state = sum(state) or 1.0
    fixed = [fixed_total * s / total_state for s in state]
    # bytes crossing a cut just before each layer (whole values, as stages hand them on)
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {}
    for n in nodes:
        if n.op in ("call_function", "call_method") and isinstance(n.meta.get("val"),
                                                                     torch.Tensor):
            last_use[n] = max((position[u] for u in n.users), default=position[n])
    boundary = [0.0] * L
    scale = _activation_scale(options)
    for j in range(1, L):
        s0 = starts[j]
        boundary[j] = scale * sum(v.meta["val"].numel() * v.meta["val"].element_size()
                                  for v, last in last_use.items() if position[v] < s0 <= last)
    return S.Prices(dict(plan.mesh), step, state, saved, fixed, boundary,
                    fixed_bytes=plan.cost.transient_bytes + plan.cost.bucket_bytes,
                    link=cluster.nodes[0].intra_node)


def _capacity(cluster, budget) -> float:
    """Bytes per device a stage on ``cluster`` may hold: the budget, else its devices'."""
    return budget or min(dv.memory_bytes for dv in cluster.devices())


def _activation_scale(options) -> float:
    """Bytes of an activation per byte of its fp32 value under the options' precision."""
    from autopar.cost.model import PRECISIONS
    return PRECISIONS[options.precision]["activation_scale"]


def _plan_config(gm, ctx, layers, config, groups, parts, mesh, budget, plans):
    """Plan every stage of ``config`` exactly and play its schedule."""
    p, n = config.p, config.p * config.v
    stage_graphs = cut(gm, layers, config.firsts, ctx.input_names)
    in_flight = _in_flight(config.schedule, p, config.v, config.micro_batches)
    planned, costs = [], []
    for s, sg in enumerate(stage_graphs):
        g = config.group_of(s)
        part = parts[g]
        cap = _capacity(part, budget)
        held = in_flight[s] if s < len(in_flight) else 1
        sctx = _stage_plan(sg, ctx, part, mesh, cap, held, plans)
        planned.append(StagePlanned(sg, sctx, groups[g]))
        costs.append(sctx.plan.cost)
    # play the schedule with the exact stage prices
    fwd, bwd, fixed, fixed_g = [], [], [], [0.0] * p
    m = config.micro_batches
    for s, st in enumerate(planned):
        per_micro = sum(r["compute_s"] + r["comm_s"]
                        for r in st.ctx.plan.nodes.values()) / m   # the plan's are m's
        fwd.append(per_micro * (1 - S.BACKWARD_SHARE))
        bwd.append(per_micro * S.BACKWARD_SHARE)
        fixed.append(max(st.ctx.plan.cost.total_s - m * per_micro, 0.0))
        fixed_g[s % p] += fixed[-1]
    transfer = []
    for s in range(n - 1):
        link = S.link_between(ctx.cluster, groups[config.group_of(s)],
                              groups[config.group_of(s + 1)])
        nbytes = _activation_scale(ctx.options) * sum(t.numel() * t.element_size() for t in
                     (ph.meta["val"] for ph in planned[s + 1].graph.gm.graph.nodes
                      if ph.op == "placeholder" and ph.name in (planned[s].graph.outputs or ())))
        nxt = parts[config.group_of(s + 1)]
        within = min((node.intra_node for node in nxt.nodes),
                     key=lambda lk: lk.bandwidth_bytes_per_s)
        if len(nxt.nodes) > 1:
            within = ctx.cluster.inter_node
        transfer.append(S.transfer_seconds(nbytes, link, len(groups[0]), within))
    orders = S.schedule_orders(config.schedule, p, config.v, m)
    config.played = S.play(orders, fwd, bwd, transfer or [0.0], fixed_g)
    config.predicted_s = config.played.step_s
    config.stage_costs = costs
    config.stage_times = [S.StageTimes(*t) for t in zip(fwd, bwd, fixed, transfer + [0.0])]
    return config, planned


def _stage_plan(sg, ctx, cluster, mesh, cap, held, plans):
    """Plan one stage's program on its devices: its budget less the activations of the
    ``held - 1`` micro-batches it holds besides the one the plan counts. ``plans``: the
    :class:`_StagePlans` of the stages planned before."""
    options = ctx.options.replace(mesh=mesh, stages=None, schedule=None)
    reserve = 0.0
    for _ in range(3):
        sctx = dataclasses.replace(
            ctx, cluster=cluster, options=options.replace(memory_budget_bytes=cap - reserve),
            example_inputs=[ph.meta["val"] for ph in sg.gm.graph.nodes
                            if ph.op == "placeholder"],
            input_names=list(sg.input_names), unsupported=list(ctx.unsupported),
            stats={"seconds": ctx.stats.get("seconds", {})})
        if cap - reserve <= 0:
            raise NoFit(cap, cluster, cap + reserve)
        gm = sg.gm
        fold_repeated_blocks(gm, sctx)
        plans.plan(gm, sctx)
        cost = sctx.plan.cost
        need = cost.memory_bytes_per_device + (held - 1) * cost.saved_bytes
        if need <= cap * (1 + 1e-9):
            return sctx
        reserve = need - cost.memory_bytes_per_device + reserve
    raise NoFit(cap, cluster, need)


class _StagePlans:
    """Stage programs planned so far, by all their plans depend on: a stage that is another's
    program under other names (the middle stages of a pipeline, alike layers of other
    indices), on the same kind of devices, mesh and budget, takes its plan (the same exact
    problem; :func:`~passes.assign_layouts.carry_plan`)."""

    def __init__(self):
        self.done = {}
        self.solved = self.carried = 0

    def plan(self, gm, ctx):
        """Set ``ctx.plan`` of stage program ``gm`` (folded), carried or solved."""
        blocks = getattr(ctx, "blocks", [])
        recompute = resolve_recompute(ctx.options.recompute, block_paths(blocks))
        key = (program_key(gm, ctx), _signature(ctx.cluster),
               tuple((ctx.options.mesh or {}).items()), ctx.options.memory_budget_bytes,
               tuple(recompute.get(path) for path in block_paths(blocks)))
        known = self.done.get(key)
        if known is not None and carry_plan(*known, gm, ctx):
            self.carried += 1
            return
        assign_layouts(gm, ctx)
        self.solved += 1
        self.done[key] = (gm, ctx)


def _pipeline_plan(ctx, config, planned, layers) -> Plan:
    """One Plan of the pipeline: every stage's layouts, its stages, the played cost."""
    first = planned[0].ctx.plan
    placements, inputs, nodes, recompute, uses, pinned = {}, {}, {}, {}, {}, {}
    stages = []
    worst = None
    p = config.p
    for s, st in enumerate(planned):
        plan = st.ctx.plan
        for k, v in plan.placements.items():
            placements.setdefault(k, v)
        for k, v in plan.inputs.items():
            if k in ctx.input_names:   # not the values handed between stages
                inputs.setdefault(k, v)
        nodes.update(plan.nodes)
        recompute.update(plan.recompute)
        for k, v in plan.uses.items():
            uses.setdefault(k, v)
        pinned.update(plan.pinned)
        held = config.played.in_flight[s]
        memory = plan.cost.memory_bytes_per_device + (held - 1) * plan.cost.saved_bytes
        stage_cost = dataclasses.replace(plan.cost, memory_bytes_per_device=memory)
        if worst is None or memory > worst.memory_bytes_per_device:
            worst = stage_cost
        dev = st.ctx.cluster.devices()[0].name
        stages.append({"stage": s, "ranks": [st.ranks.start, st.ranks.stop - 1],
                       "device": f"{dev} x {len(st.ranks)}", "layers": list(st.graph.layers),
                       "mesh": dict(plan.mesh), "time_s": plan.cost.total_s,
                       "memory_bytes": memory, "micro_batches_held": held,
                       "budget_bytes": _capacity(st.ctx.cluster, ctx.options.memory_budget_bytes),
                       # the stage's own cost, holding one micro-batch: memory_bytes's parts
                       "cost": dataclasses.asdict(plan.cost),
                       # one micro-batch's forward and backward, the step's gradient sums
                       # and optimizer, the hand-over to the next stage: the played schedule
                       **config.stage_times[s]._asdict(),
                       # how far the stage's own per-op plan may be from its program's best
                       # (the cuts and the schedule are searched, not bounded)
                       "optimality": plan.stats.get("optimality")})
    cost = dataclasses.replace(worst, total_s=config.predicted_s,
                               compute_s=max(config.played.busy_s),
                               comm_s=sum(c.comm_s for c in config.stage_costs))
    stats = ctx.stats
    stats["pipeline"] = {"bubble": config.played.bubble, "order": list(config.groups),
                         "firsts": list(config.firsts)}
    sub = dict(first.mesh) if math.prod(first.mesh.values()) > 1 else {}
    return Plan(mesh={"pp": p, **sub}, placements=placements, inputs=inputs, nodes=nodes,
                cost=cost, stats=stats, cluster=str(ctx.cluster), recompute=recompute,
                micro_batches=config.micro_batches, uses=uses, pinned=pinned, stages=stages,
                schedule=config.schedule if config.v == 1 else
                f"interleaved-1f1b-v{config.v}")


__all__ = ["plan_stages", "StagePlanned"]
