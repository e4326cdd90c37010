"""Choosing the plan: candidate meshes, the propagation planner (level "fast"), and the
choice between meshes.

Level "fast" walks the graph once per mesh and gives each op the strategy that is cheapest
given the layouts its inputs arrive in (an input or a parameter takes the layout its first
reader wants); it also tries parameters stored sharded on the outermost axis (ZeRO-3/FSDP)
and keeps the cheaper assignment that fits in memory. Level "full" solves the integer program
of :mod:`autopar.search.solver` per mesh and keeps the better of it and the fast plan. Either way the
mesh with the least predicted step time wins.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import os
import time
from dataclasses import dataclass

import numpy as np

from ..cost.model import CostModel, Training
from ..errors import NoFit, PlanError
from ..options import Options
from ..program.graph import paused_gc
from ..program.mesh import Mesh
from ..program.placement import Shard
from .pricing import Facts
from .pins import Pins, resolve_pins
from .problem import Problem, build_problem
from .result import GREEDY, HINTED, PRUNED, Optimality, Planned
from .highs import TURNS
from .solver import (TIME_LIMIT_S, Dominated, Infeasible, memory_floor, relaxation_bound,
                     solve)

AXIS_NAMES = {1: ("dp",), 2: ("dp", "tp"), 3: ("dp", "sp", "tp")}
# Past this many (producer layout, consumer need) pairs the exact program keeps, per node,
# the KEEP_PER_NODE strategies of best local score plus those of the fast plans.
MAX_EXACT_PAIRS = 150_000
KEEP_PER_NODE = 24
# Meshes whose plan with every instance of a repeated block tied comes within 2/n of the
# best (n instances), and never more than this, are planned again with the first and last
# instances apart (:func:`_ends_margin`).
REFINE_MARGIN = 0.10
# Meshes of three axes are searched only where a two-axis mesh they refine planned within
# this much of the best plan (:func:`_worth_refining`).
THREE_AXIS_MARGIN = 0.10
# Seconds HiGHS may take per program with the ends apart or mixed (a safety net: where memory
# binds it solves a program restricted to the relaxation's support, in well under a second).
REFINE_TIME_LIMIT_S = 5.0
# The most a plan refined without its own relaxation spends on solving that relaxation
# after the search, for the bound plan.stats reports (none is reported past it).
BOUND_TIME_LIMIT_S = 5.0
# Where memory binds, the relaxation of the chosen mesh's folded program gives some instances
# of a block one strategy and the rest another; the mesh is then planned again with the
# middle instances cut in two runs at (up to this many of) the shares it names, each one
# more exact program of up to REFINE_TIME_LIMIT_S.
MAX_MIXES = 2
# Threads planning the meshes of one batch side by side (at most one per core): they take
# turns at Python, and their HiGHS runs overlap the building of the next program.
MAX_THREADS = 4


def candidate_meshes(cluster, mesh_request) -> list:
    """The user's mesh, else every factorization of the device count into up to three axes
    (outer to inner; the innermost axis spans the most closely linked devices)."""
    n = cluster.world_size
    if mesh_request is not None:
        mesh = Mesh.from_dict(mesh_request)
        if mesh.size != n:
            raise PlanError(f"mesh {mesh} has {mesh.size} devices but the cluster {cluster} has "
                            f"{n}; give axes whose sizes multiply to {n}")
        return [mesh]
    shapes = [(n,)]
    for a in _divisors(n):
        shapes.append((a, n // a))
        for b in _divisors(n // a):
            shapes.append((a, b, n // a // b))
    return [Mesh(AXIS_NAMES[len(s)], s) for s in shapes]


def _promise(mesh: Mesh, cluster) -> tuple:
    """Meshes likely to plan well first, so that the exact programs of the others can stop
    at their relaxation's bound: up to two axes before three (those are searched as
    refinements of them, :func:`_worth_refining`), innermost axis filling a node, then fewer
    axes. Ties between plans go to the earlier candidate, whatever this order."""
    per_node = cluster.nodes[0].count if cluster.nodes else 1
    return (mesh.ndim > 2, mesh.shape[-1] != per_node, mesh.ndim, mesh.shape)


def _worth_refining(mesh: Mesh, reached: dict, best) -> bool:
    """A mesh of three axes (a, b, c) is searched where one of the two-axis meshes it
    refines, (a·b, c) or (a, b·c), planned (or was bounded) within THREE_AXIS_MARGIN of the
    best plan so far: it can express every plan of those (placing alike on the two axes
    merged) and more, such as the sequence split on an axis of its own. Where neither came
    close, the third axis has little to work with, and its program, many times larger, is
    not worth the time."""
    if mesh.ndim < 3 or best is None:
        return True
    a, b, c = mesh.shape
    limit = best.cost.total_s * (1 + THREE_AXIS_MARGIN)
    return any(reached.get(m, float("inf")) <= limit for m in ((a * b, c), (a, b * c)))


def _divisors(n: int) -> list:
    return [d for d in range(2, n) if n % d == 0]


def propagate(prob: Problem, sharded_params: bool = False) -> dict:
    """Greedy assignment in graph order; sources take the layout their first reader wants.
    An edge into a folded block from its own later part (the value the instance before made)
    is not looked at: its producer comes later in this order."""
    incoming = {n: [] for n in prob.nodes}
    pos = prob.index()
    for e in prob.edges:
        if e.dst in incoming and pos[e.src] < pos[e.dst]:
            incoming[e.dst].append(e)
    allowed = {n: range(len(prob.options[n])) for n in prob.nodes}
    if sharded_params:
        for n in prob.nodes:
            if n.op == "get_attr" and len(prob.options[n]) > 1:
                sharded = [i for i, s in enumerate(prob.options[n])
                           if isinstance(s.output[0], Shard)]
                allowed[n] = sharded or allowed[n]
    choice = {}
    for n in prob.nodes:
        if n in choice or not incoming[n] and n.op in ("placeholder", "get_attr"):
            continue
        ok = np.asarray(allowed[n])
        t = prob.weight.get(n, 1) * np.asarray(prob.node_s[n])[ok]
        picks = {}  # an unplaced source -> its best strategy for each of n's
        for e in incoming[n]:
            if e.src in choice:
                t = t + e.row(choice[e.src])[ok]
            elif e.src in picks:
                t = t + e.matrix()[picks[e.src], ok]
            else:
                src_ok = np.asarray(allowed[e.src])
                ws = prob.weight.get(e.src, 1)
                m = ws * np.asarray(prob.node_s[e.src])[src_ok][:, None] + \
                    e.matrix()[np.ix_(src_ok, ok)]
                best_src = np.argmin(m, axis=0)
                picks[e.src] = src_ok[best_src]
                t = t + m[best_src, np.arange(len(ok))]
        if not len(ok) or not np.isfinite(t).any():
            raise PlanError(f"no strategy fits {n.format_node()}")
        i = int(np.argmin(t))
        choice[n] = int(ok[i])
        choice.update({src: int(p[i]) for src, p in picks.items()})
    for n in prob.nodes:
        choice.setdefault(n, allowed[n][0])
    return choice


def plan_on_mesh(gm, mesh, cluster, training, pinned, budget, level, stats,
                 blocks=(), cutoff: float = float("inf"), folding="ends",
                 time_limit_s: float = TIME_LIMIT_S, facts: Facts | None = None,
                 hint=None, recompute=None) -> tuple:
    """(problem, choice, cost, relaxation support or None, :class:`Optimality`) of the best
    assignment on ``mesh``; raises Infeasible, or Dominated when the exact program proves no
    plan here beats ``cutoff`` seconds. ``hint``: see :func:`solve`."""
    start = time.perf_counter()
    model = CostModel(cluster, mesh, training)
    facts = facts if facts is not None else Facts()
    prob = build_problem(gm, mesh, model, pinned, blocks, folding, facts)
    if recompute:
        prob = recompute.apply(prob, facts)
    if memory_floor(prob) > budget * (1 + 1e-9):
        raise Infeasible(prob)   # no assignment fits: nothing to search for
    built = time.perf_counter()
    found, objective, greedy, shares, support = [], None, [], (), None
    bound, restricted = None, () if level == "full" else (GREEDY,)
    pairs = prob.pair_count() if level == "full" else 0
    if level == "fast" or pairs > MAX_EXACT_PAIRS:  # the answer, or seeds of a pruned program
        for sharded in (False, True):
            choice = propagate(prob, sharded_params=sharded)
            greedy.append(choice)
            cost = prob.evaluate(choice)
            if cost.memory_bytes_per_device <= budget:
                found.append((cost.total_s, choice, cost))
    if level == "full":
        exact, back = prob, None
        if pairs > MAX_EXACT_PAIRS:
            seeds = sorted(found, key=lambda f: f[0])
            exact, back = _pruned(prob, [f[1] for f in seeds] + greedy)
            restricted += (PRUNED,)
        try:
            best_found = min((f[0] for f in found), default=float("inf"))
            solved = solve(exact, budget, time_limit_s, cutoff=min(cutoff, best_found),
                           hint=hint)
            choice, objective = solved.choice, solved.objective
            shares, support = solved.shares, solved.support
            restricted += solved.restricted
            if back is None:
                bound = solved.bound
            else:   # (a pruned program's bound is its own, not the whole one's)
                choice = {n: back[n][i] for n, i in choice.items()}
            cost = prob.evaluate(choice)
            if cost.memory_bytes_per_device <= budget * (1 + 1e-9):
                found.append((cost.total_s, choice, cost))
        except Infeasible:
            if not found:
                raise
        except Dominated as e:
            stats.setdefault("meshes", {})[str(mesh)] = {
                "strategies": sum(len(v) for v in prob.options.values()), "pairs": pairs,
                "problem_nodes": len(prob.nodes), "folding": folding,
                "build_s": built - start,
                "solve_s": time.perf_counter() - built, "predicted_step_s": None,
                "exact_objective_s": None, "lower_bound_s": e.bound}
            if not found or min(f[0] for f in found) > cutoff:
                raise
            restricted += (GREEDY,)
    if not found:
        raise Infeasible(prob)
    found.sort(key=lambda f: f[0])
    _, choice, cost = found[0]
    stats.setdefault("meshes", {})[str(mesh)] = {
        "strategies": sum(len(v) for v in prob.options.values()),
        "pairs": pairs if level == "full" else None,
        "problem_nodes": len(prob.nodes), "folding": folding,
        "build_s": built - start, "solve_s": time.perf_counter() - built,
        "predicted_step_s": cost.total_s, "exact_objective_s": objective,
        "split_shares": shares, "hinted": hint is not None, "bound_s": bound,
        "restricted": list(restricted)}
    return prob, choice, cost, support, Optimality(bound, restricted)


def _pruned(prob: Problem, seeds: list) -> tuple:
    """``prob`` keeping each node's best-scoring strategies next to the first seed and every
    strategy the seed assignments use, so the exact plan is never worse than the seeds."""
    scores = prob.scores_near(seeds[0])
    kept = {}
    for n in prob.nodes:
        order = np.argsort(scores[n], kind="stable")  # ties: the earlier strategy
        keep = set(order[:KEEP_PER_NODE].tolist()) | {seed[n] for seed in seeds}
        kept[n] = sorted(keep)
    return prob.restrict(kept)


def _named_sources(gm, input_names) -> dict:
    """Parameters and buffers by FQN, inputs by argument name: what constraints name."""
    out, names = {}, iter(input_names)
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            out[n.target] = n
        elif n.op == "placeholder":
            out[next(names, n.name)] = n
    return out


def choose_plan(gm, cluster, options: Options, training: Training, budget: float, stats: dict,
                input_names=(), blocks=(), recompute=None, facts: Facts | None = None,
                refine_bound: bool = True, mesh: dict | None = None):
    """The best (mesh, problem, choice, cost) over candidate meshes (``mesh``, else
    ``options.mesh``, else every one), the options' ``constraints`` and ``storage`` pinned as
    :func:`resolve_pins` says, with ``recompute``
    (:class:`~autopar.search.recompute.Recompute`) applied to every problem; ``facts`` may be
    shared by searches on the same program. Without ``refine_bound``, plans that memory
    binds are not refined (with the ends apart, mixed): the costliest programs, not worth
    solving where recomputation may free the memory instead."""
    with paused_gc():
        return _choose_plan(gm, cluster, options, training, budget, stats, input_names,
                            blocks, recompute, facts, refine_bound, mesh)


def _choose_plan(gm, cluster, options, training, budget, stats, input_names, blocks,
                 recompute, facts, refine_bound=True, mesh_request=None):
    sources = _named_sources(gm, input_names)
    search = _Search(gm, cluster, training, budget, options.level, stats, blocks, recompute,
                     facts)
    pinned, refused = {}, []
    for m in candidate_meshes(cluster, mesh_request or options.mesh):
        try:  # pins name the meshes they fit: one placement per axis
            pinned[m] = resolve_pins(options.constraints, options.storage, sources, m)
        except PlanError as e:
            refused.append(e)
    if not pinned:
        raise refused[0]
    candidates = list(pinned)
    rank = {str(m): i for i, m in enumerate(candidates)}
    meshes = sorted(candidates, key=lambda m: _promise(m, cluster))
    # Repeated blocks with all instances tied make a program a third the size: compare the
    # meshes on it, then plan the first and last instances apart on the meshes within
    # _ends_margin of the best.
    refine = any(len(c.instances) >= 3 for c in blocks)
    folding = "tied" if refine else "ends"
    margin = _ends_margin(blocks) if refine else 1e-9
    refinable = any(m.ndim == 3 for m in meshes)
    best, tied, reached = None, [], {}   # reached: mesh shape -> seconds, or a lower bound

    def cutoff(extra: float) -> float:
        return best.cost.total_s * (1 + extra) if best else float("inf")

    def take(outcomes):
        nonlocal best
        for o in outcomes:
            if o.kind == "plan":
                reached[o.mesh.shape] = o.cost.total_s
                if o.folding == folding:
                    tied.append(o)
                if best is None or (o.cost.total_s, rank[str(o.mesh)]) < (
                        best.cost.total_s, rank[str(best.mesh)]):
                    best = o
            elif o.kind == "dominated" and o.folding == folding:
                reached[o.mesh.shape] = o.bound

    progress = _LazyProgress()
    # up to two axes: the most promising mesh first, the others bounded by its plan (planned
    # to the end, or bounded, within the margin that chooses three-axis refinements)
    flat = [m for m in meshes if m.ndim < 3]
    wide = max(margin, THREE_AXIS_MARGIN) if refinable else margin
    for m in flat[:1]:
        take(search.run([_Job(m, pinned[m], folding, cutoff(wide))], progress))
    take(search.run([_Job(m, pinned[m], folding, cutoff(wide)) for m in flat[1:]], progress))
    # three axes, as refinements of the meshes above that came close; side by side with them,
    # the tied plans refined so far (with the ends apart, mixed) as far as those are known
    deep = [m for m in meshes if m.ndim == 3]
    chosen = [m for m in deep if _worth_refining(m, reached, best)]
    stats["meshes_skipped"] = [str(m) for m in deep if m not in chosen]
    planned, refined = set(), []

    def refinements() -> list:
        """Jobs not planned yet refining the tied plans: the ends apart where a tied plan
        came within the margin of the best (the tied plan stays the answer unless that
        beats it: a pruned program may lose its strategies, or no longer fit); and where
        memory binds on the best mesh, its middle instances cut in two runs (OSDP's mix of
        sharded and replicated layers) at the shares a relaxation split them: the tied
        one's where memory binds there (its ends apart then solve no relaxation of their
        own), else the ends apart's once planned."""
        if not refine or best is None:
            return []
        limit = best.cost.total_s * (1 + margin)
        near = sorted((o for o in tied if o.cost.total_s <= limit and (
                          refine_bound or o.support is None)),
                      key=lambda o: (o.cost.total_s, rank[str(o.mesh)]))
        out = [_Job(o.mesh, o.pinned, "ends", cutoff(1e-9), REFINE_TIME_LIMIT_S, o.hint())
               for o in near]
        base = next(o for o in tied if o.mesh == best.mesh)
        ends = [o for o in refined if o.mesh == best.mesh and o.folding == "ends"]
        source = base if base.support is not None else next(iter(ends), None)
        shares = _distinct_cuts(source.shares)[:MAX_MIXES] if source and refine_bound else ()
        out += [_Job(best.mesh, best.pinned, ("mixed", f), cutoff(1e-9), REFINE_TIME_LIMIT_S,
                     base.hint()) for f in shares]
        return [j for j in out if (j.mesh, j.folding) not in planned]

    # (the refinements first: their programs, the largest, solve while the others build)
    jobs = refinements() + [_Job(m, pinned[m], folding, cutoff(margin)) for m in chosen]
    while jobs:
        planned.update((j.mesh, j.folding) for j in jobs)
        outcomes = search.run(jobs, progress)
        take(outcomes)
        refined += [o for o in outcomes if o.folding != folding]
        jobs = refinements()
    progress.close()
    if best is None:
        infeasible = search.infeasible
        raise NoFit(budget, cluster, lambda: min(Infeasible(o.prob).min_bytes for o in infeasible),
                    options.level)
    optimality = best.optimality
    if optimality.bound_s is None and HINTED in optimality.restricted:
        # refined on the tied plan's strategies, its own relaxation never solved: solve it
        # now, for this plan only, to say how far the plan may be from its program's best
        with contextlib.suppress(Infeasible):
            optimality = Optimality(relaxation_bound(best.prob, budget, BOUND_TIME_LIMIT_S),
                                    optimality.restricted)
    return Planned(best.mesh, best.prob, best.choice, best.cost,
                   optimality=optimality.folded(best.folding, blocks))


@dataclass
class _Job:
    """One program to plan: a mesh, its pinned sources, how blocks fold, the cutoff."""

    mesh: Mesh
    pinned: Pins
    folding: object
    cutoff: float
    time_limit_s: float = TIME_LIMIT_S
    hint: object = None       # see solve()


@dataclass
class _Outcome:
    """What planning a :class:`_Job` gave: ``kind`` "plan" (with its problem, choice and
    cost), "dominated" (with the bound) or "infeasible" (with its problem)."""

    mesh: Mesh
    pinned: Pins
    folding: object
    kind: str
    cost: object = None
    choice: object = None
    bound: float | None = None
    prob: Problem | None = None
    shares: tuple = ()        # where memory binds, the relaxation's (see solve())
    support: dict | None = None
    optimality: Optimality | None = None

    def hint(self):
        """Where memory binds, the strategies this plan's relaxation used, for the programs
        refining it (the same mesh with instances planned apart): each of their nodes may
        use what the node standing for it here did. Their own relaxations, several times
        larger, would take most of their time, and mostly use the same strategies."""
        if self.support is None:
            return None
        support, rep = self.support, self.prob.rep
        return lambda n: support.get(rep.get(n, n))


class _Search:
    """Plans batches of jobs whose cutoffs are fixed before each batch, so that the outcome
    of each job does not depend on the others (nor on their order)."""

    def __init__(self, gm, cluster, training, budget, level, stats, blocks, recompute=None,
                 facts=None):
        self.gm, self.cluster, self.training = gm, cluster, training
        self.budget, self.level, self.stats, self.blocks = budget, level, stats, blocks
        self.recompute = recompute
        # what the problems built on this program share
        self.facts = facts if facts is not None else Facts()
        self.infeasible = []

    def run(self, jobs: list, progress) -> list:
        """The outcomes of ``jobs``, planned side by side: each thread builds its programs
        in turn, and HiGHS solves one while the next is built (:class:`Turns`)."""
        progress.total += len(jobs)
        outcomes = []
        threads = min(len(jobs), os.cpu_count() or 1, MAX_THREADS)
        with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
            if threads > 1:
                running = [pool.submit(self._plan_in_turn, job) for job in jobs]
                results = (future.result() for future in running)
            else:
                results = (self._plan_in_turn(job) for job in jobs)
            for job, (out, stats) in zip(jobs, results):
                progress.advance(f"mesh {job.mesh}")
                outcomes.append(out)
                # in the order of the jobs, whichever finished first
                self.stats.setdefault("meshes", {}).update(stats.get("meshes", {}))
        self.infeasible += [o for o in outcomes if o.kind == "infeasible"]
        return outcomes

    def _plan_in_turn(self, job: _Job) -> tuple:
        stats = {}
        with TURNS.python():
            return self.plan(job, stats), stats

    def plan(self, job: _Job, stats: dict) -> _Outcome:
        out = _Outcome(job.mesh, job.pinned, job.folding, "plan")
        try:
            out.prob, out.choice, out.cost, out.support, out.optimality = plan_on_mesh(
                self.gm, job.mesh, self.cluster, self.training, job.pinned, self.budget,
                self.level, stats, self.blocks, cutoff=job.cutoff, folding=job.folding,
                time_limit_s=job.time_limit_s, facts=self.facts, hint=job.hint,
                recompute=self.recompute)
            out.shares = stats["meshes"][str(job.mesh)].get("split_shares", ())
        except Dominated as e:
            out.kind, out.bound = "dominated", e.bound
        except Infeasible as e:
            out.kind, out.prob = "infeasible", e.prob
        return out


def _distinct_cuts(shares) -> list:
    """The shares at which to cut the middle instances, a share f dropped where 1 - f came
    before it: cut at either, the two runs can take the same strategies in the same
    numbers (in the other order, which changes one edge between them and where memory
    peaks, little)."""
    out = []
    for f in shares:
        if not any(abs(f + g - 1) < 0.015 for g in out):
            out.append(f)
    return out


def _ends_margin(blocks) -> float:
    """How far behind the best a tied plan may be and still be planned with the ends apart.
    Freeing the first and last of n instances changes the work of two in n, so it gains
    about 2/n of the tied plan at most (the edges into and out of the chain aside); never
    more than REFINE_MARGIN."""
    n = min(len(c.instances) for c in blocks if len(c.instances) >= 3)
    return min(REFINE_MARGIN, 2 / n)


# Who shows the progress of planning: None, a bar of its own on a terminal; else a callable
# (label, programs planned, programs to plan) of a caller showing a display of its own (the
# command line's), set around its call.
PROGRESS = contextvars.ContextVar("autopar_planning_progress", default=None)


class _LazyProgress:
    """A progress bar over the programs planned (one per candidate mesh, and the
    refinements), on a terminal, shown only once planning has taken longer than a second;
    quiet otherwise. Where :data:`PROGRESS` is set, told to it instead."""

    def __init__(self, total: int = 0, after_s: float = 1.0):
        self.total, self.after_s = total, after_s
        self.start = time.perf_counter()
        self.done, self.bar, self.task = 0, None, None
        self.sink = PROGRESS.get()

    def advance(self, label: str):
        if self.sink is not None:
            self.sink(label, self.done, self.total)
            self.done += 1
            return
        if self.bar is None and time.perf_counter() - self.start > self.after_s:
            import sys

            from rich.console import Console
            from rich.progress import Progress
            console = Console(stderr=True)
            # FORCE_COLOR, which many CI runners set, makes rich call a log file a terminal
            if sys.stderr.isatty() and console.is_terminal:
                self.bar = Progress(console=console, transient=True)
                self.bar.start()
                self.task = self.bar.add_task("planning", total=self.total)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, total=self.total,
                            description=f"planning: {label}")
        self.done += 1

    def close(self):
        if self.bar is not None:
            self.bar.stop()
