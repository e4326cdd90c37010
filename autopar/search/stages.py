"""Pipeline stages as a layer of the search: how the devices and the program's layers are cut
into stages, each planned on its own sub-mesh by the layers below.

The devices, in rank order, are cut into p equal groups (whole nodes, or equal parts of one);
stage s runs a contiguous run of the program's layers on group ``order[s % p]`` (interleaved
1F1B runs v chunks per group: p * v stages). The step time of a schedule is found by playing it
(:func:`play`): every group runs its list of forward and backward actions in order, each when
its input has arrived over the link between the groups, so uneven stages, groups of different
speeds and slow links between them are priced as they run. The same play counts the
micro-batches each stage holds at once, which its memory is priced with.

The cut is an exact dynamic program (as in Alpa and AMP) over the layers' prices on each group
(:class:`Prices`, from a plan of the whole program on that group's devices): for each bound on
the slowest stage, the least total of stage times whose every stage fits that bound and its
devices' memory; the step of GPipe and 1F1B is the sum plus (m - 1) times the slowest stage.
The best cuts are then planned exactly, stage by stage, and played again.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..errors import PlanError

# Backward takes about twice the forward's time (two matmuls per forward matmul): how a
# stage's step time per micro-batch splits between its forward and backward actions.
BACKWARD_SHARE = 2 / 3
# Cuts planned exactly, best estimate first, until one fits.
EXACT_CANDIDATES = 3
# Orders of device groups along the pipeline tried on a mixed cluster, at most.
MAX_ORDERS = 24


class Stage(NamedTuple):
    """A contiguous run of the program's layers on a contiguous run of the cluster's ranks."""

    ranks: range
    layers: str     # which of the program's layers, in words


class Action(NamedTuple):
    kind: str       # "F" forward, "B" backward
    stage: int
    micro: int


class Span(NamedTuple):
    """When one action ran, as :func:`play` plays it: on which group, from and to."""

    group: int
    action: Action
    start_s: float
    end_s: float


class StageTimes(NamedTuple):
    """What one stage takes as its schedule is played: the forward and backward of one
    micro-batch, its gradient sums and optimizer once per step, and handing a micro-batch's
    values to the next stage (0 for the last)."""

    forward_s: float
    backward_s: float
    fixed_s: float
    transfer_s: float


# -- schedules ---------------------------------------------------------------------------------

def schedule_orders(name: str, p: int, v: int, m: int) -> list:
    """Per rank group (0..p-1) the actions it runs, in order, for ``m`` micro-batches over
    p * v stages (stage s on group s % p). Raises a PlanError where the schedule cannot run."""
    if name in ("1f1b", "interleaved-1f1b") and m < p:
        raise PlanError(f"schedule {name!r} with {p} stages needs at least {p} micro-batches, "
                        f"got {m}; use micro_batches >= {p}, or schedule='gpipe'")
    if name == "gpipe":
        return [[Action("F", r, k) for k in range(m)] + [Action("B", r, k) for k in range(m)]
                for r in range(p)]
    if name == "1f1b":
        out = []
        for r in range(p):
            warm = min(p - r - 1, m)
            acts = [Action("F", r, k) for k in range(warm)]
            for k in range(m - warm):
                acts += [Action("F", r, warm + k), Action("B", r, k)]
            acts += [Action("B", r, k) for k in range(m - warm, m)]
            out.append(acts)
        return out
    if name == "interleaved-1f1b":
        if m % p:
            raise PlanError(f"schedule 'interleaved-1f1b' runs micro-batches in rounds of the "
                            f"{p} stages: micro_batches={m} is not a multiple of {p}")
        total = m * v

        def fwd(i, r):
            chunk = (i // p) % v
            return Action("F", chunk * p + r, (i // (p * v)) * p + i % p)

        def bwd(i, r):
            chunk = v - 1 - (i // p) % v
            return Action("B", chunk * p + r, (i // (p * v)) * p + i % p)

        out = []
        for r in range(p):
            warm = min((p - r - 1) * 2 + (v - 1) * p, total)
            acts = [fwd(i, r) for i in range(warm)]
            for i in range(total - warm):
                acts += [fwd(warm + i, r), bwd(i, r)]
            acts += [bwd(i, r) for i in range(total - warm, total)]
            out.append(acts)
        return out
    raise PlanError(f"schedule {name!r}: choose gpipe, 1f1b or interleaved-1f1b")


@dataclass
class Played:
    """A schedule played with given stage times."""

    step_s: float                 # the last action's end, plus each group's fixed time
    busy_s: list                  # per group: seconds it computes
    in_flight: list               # per stage: most micro-batches whose activations it holds
    spans: list = field(default_factory=list)   # every action run, a Span, in order run

    @property
    def bubble(self) -> float:
        """The share of the step the average group is idle."""
        if self.step_s <= 0:
            return 0.0
        return 1 - sum(self.busy_s) / (len(self.busy_s) * self.step_s)


def play(orders: list, forward_s: list, backward_s: list, transfer_s: list,
         fixed_s: list | None = None) -> Played:
    """Run the actions of every group (``orders``, as :func:`schedule_orders` gives) with
    per stage forward and backward seconds (one micro-batch) and ``transfer_s[s]`` to move
    a micro-batch's values between stage s and s + 1 (either way); ``fixed_s`` per group
    (gradient sums and optimizer). Raises RuntimeError where the orders deadlock."""
    p, stages = len(orders), len(forward_s)
    done = {}
    free = [0.0] * p
    nxt = [0] * p
    held = [0] * stages
    most = [0] * stages
    busy = [0.0] * p
    spans = []
    left = sum(len(o) for o in orders)
    while left:
        moved = False
        for r in range(p):
            while nxt[r] < len(orders[r]):
                a = orders[r][nxt[r]]
                s, k = a.stage, a.micro
                if a.kind == "F":
                    need = [("F", s - 1, k)] if s > 0 else []
                    dur, link = forward_s[s], transfer_s[s - 1] if s > 0 else 0.0
                else:
                    need = [("F", s, k)] + ([("B", s + 1, k)] if s + 1 < stages else [])
                    dur, link = backward_s[s], transfer_s[s] if s + 1 < stages else 0.0
                if any(n not in done for n in need):
                    break
                ready = max([free[r]] + [done[n] + (link if n[1] != s else 0.0)
                                         for n in need])
                done[(a.kind, s, k)] = free[r] = ready + dur
                spans.append(Span(r, a, ready, ready + dur))
                busy[r] += dur
                held[s] += 1 if a.kind == "F" else -1
                most[s] = max(most[s], held[s])
                nxt[r] += 1
                left -= 1
                moved = True
        if not moved:
            raise RuntimeError("pipeline schedule deadlocks: "
                               f"{[o[n] for o, n in zip(orders, nxt) if n < len(o)]}")
    fixed_s = fixed_s or [0.0] * p
    return Played(max(f + x for f, x in zip(free, fixed_s)), busy, most, spans)


# -- prices and the cut ------------------------------------------------------------------------

@dataclass
class Prices:
    """What each layer costs on one group of devices (one micro-batch), from a plan of the
    whole program there: ``step_s[j]`` forward and backward seconds of layer j (the ops
    before the first layer go with layer 0, those after the last with the last), its
    parameters' bytes (with gradients and optimizer states), the activation bytes it saves
    for backward, seconds of gradient sums and optimizer per step, ``boundary_bytes[j]`` the
    values crossing a cut just before layer j; ``fixed_bytes`` the transient of a stage."""

    mesh: dict
    step_s: list
    state_bytes: list
    saved_bytes: list
    fixed_s: list
    boundary_bytes: list
    fixed_bytes: float = 0.0
    link: object = None            # within the group

    def stage(self, lo: int, hi: int, in_flight: int = 1) -> tuple:
        """(seconds per micro-batch, seconds per step, bytes per device) of layers lo..hi-1."""
        t = sum(self.step_s[lo:hi])
        mem = sum(self.state_bytes[lo:hi]) + in_flight * sum(self.saved_bytes[lo:hi]) + \
            self.fixed_bytes
        return t, sum(self.fixed_s[lo:hi]), mem


@dataclass
class Config:
    """One pipeline: groups in pipeline order, the cut, schedule and micro-batches."""

    p: int
    v: int
    schedule: str
    micro_batches: int
    groups: list                  # per group position: the group index (rank range order)
    firsts: list                  # first layer of each of the p * v stages
    predicted_s: float = math.inf
    played: Played | None = None
    stage_costs: list = field(default_factory=list)
    stage_times: list = field(default_factory=list)   # per stage: its StageTimes, as played

    def group_of(self, stage: int) -> int:
        return self.groups[stage % self.p]


def link_between(cluster, a: range, b: range):
    """The link joining two groups of ranks: within one node, its link; else the network."""
    na, nb = {cluster.node_of(r) for r in a}, {cluster.node_of(r) for r in b}
    if na == nb and len(na) == 1:
        return cluster.nodes[next(iter(na))].intra_node
    return cluster.inter_node


def transfer_seconds(nbytes: float, link, devices: int = 1, within=None) -> float:
    """Seconds to hand ``nbytes`` of values from one stage's ``devices`` to the next's over
    ``link`` (point to point, at its p2p figures where it has them): the sending stage's program returns them whole (gathered over its link
    ``within``), each device sends an equal part to its peer, and the receiving devices
    gather the parts over their own link (Megatron's scatter/gather of boundary values)."""
    latency = link.latency_s if link.p2p_latency_s is None else link.p2p_latency_s
    bandwidth = link.bandwidth_bytes_per_s if link.p2p_bandwidth_bytes_per_s is None else \
        link.p2p_bandwidth_bytes_per_s
    t = latency + nbytes / devices / bandwidth
    if devices > 1 and within is not None:
        gather = within.latency_s + nbytes * (devices - 1) / devices / \
            within.bandwidth_bytes_per_s
        t += 2 * gather
    return t


def cuts(prices_of, n_layers: int, stages: int, in_flight: list, budget_of,
         cuttable: list, slowest_times=None) -> list:
    """The best cuts of ``n_layers`` into ``stages`` stages by the objective of GPipe and
    1F1B (sum of stage times plus (m - 1) times the slowest, ``slowest_times`` the m - 1):
    ``prices_of(s)`` the :class:`Prices` of stage s's group, ``in_flight[s]`` the micro-batches
    it holds, ``budget_of(s)`` its bytes per device. Returns [(objective, firsts)], best
    first, at most :data:`EXACT_CANDIDATES`; empty where no cut fits."""
    if stages > n_layers:
        return []
    L = n_layers
    # stage time and fit of every (s, lo, hi)
    table = {}
    for s in range(stages):
        pr, cap = prices_of(s), budget_of(s)
        lo_min, lo_max = s, L - (stages - s)
        for lo in range(lo_min, lo_max + 1):
            if lo > 0 and not cuttable[lo]:
                continue
            for hi in range(lo + 1, L - (stages - s - 1) + 1):
                if hi < L and not cuttable[hi]:
                    continue
                if (s == 0) != (lo == 0) or (s == stages - 1) != (hi == L):
                    continue
                t, _, mem = pr.stage(lo, hi, in_flight[s])
                if mem <= cap:
                    table[(s, lo, hi)] = t
    if not table:
        return []
    bounds = sorted(set(round(t, 12) for t in table.values()))
    if len(bounds) > 400:   # the bounds a slowest stage may take, in 0.25% steps
        kept, last = [], -1.0
        for b in bounds:
            if b > last * 1.0025:
                kept.append(b)
                last = b
        bounds = kept + [bounds[-1]]
    m1 = slowest_times or 0
    times = np.full((stages, L + 1, L + 1), np.inf)   # [s, lo, hi]
    for (s, lo, hi), t in table.items():
        times[s, lo, hi] = t
    every = np.arange(L + 1)
    found = {}
    for bound in bounds:
        allowed = np.where(times <= bound * (1 + 1e-9), times, np.inf)
        # per stage, per end: the least sum of stage times so far and the start it came from
        # (the first such start where several tie)
        total = np.full(L + 1, np.inf)
        total[0] = 0.0
        back = []
        for s in range(stages):
            sums = total[:, None] + allowed[s]
            came = np.argmin(sums, axis=0)
            total = sums[came, every]
            back.append(came)
        if not np.isfinite(total[L]):
            continue
        firsts, hi = [], L
        for s in reversed(range(stages)):
            hi = int(back[s][hi])
            firsts.append(hi)
        firsts = tuple(reversed(firsts))
        worst = max(table[(s, lo, hi)] for s, (lo, hi) in
                    enumerate(zip(firsts, firsts[1:] + (L,))))
        objective = float(total[L]) + m1 * worst
        if firsts not in found or objective < found[firsts]:
            found[firsts] = objective
    ranked = sorted((obj, list(f)) for f, obj in found.items())
    return ranked[:EXACT_CANDIDATES]


def group_orders(signatures: list) -> list:
    """Orders of groups along the pipeline worth trying: every distinct order of their kinds
    (groups of one kind are interchangeable, taken in rank order), at most
    :data:`MAX_ORDERS`; the rank order first, then in the order of the first permutation of
    the groups giving each."""
    p = len(signatures)
    by_kind = {}
    for i, kind in enumerate(signatures):
        by_kind.setdefault(kind, []).append(i)
    taken = dict.fromkeys(by_kind, 0)

    def candidates() -> list:   # (the next group of each kind left, its kind)
        return sorted((groups[taken[k]], k) for k, groups in by_kind.items()
                      if taken[k] < len(groups))
    # depth first over the positions along the pipeline, without recursion (p may be large)
    out, order, stack = [], [], [candidates()]
    while stack and len(out) < MAX_ORDERS:
        if not stack[-1]:
            stack.pop()
            if order:
                taken[signatures[order.pop()]] -= 1
            continue
        i, kind = stack[-1].pop(0)
        order.append(i)
        taken[kind] += 1
        if len(order) == p:
            out.append(list(order))
            taken[signatures[order.pop()]] -= 1
        else:
            stack.append(candidates())
    return out


def search(cluster, plan_stage):
    """The plan of one stage holding every rank and every layer (p = 1): ``plan_stage``
    plans it with the layers below (recomputation, meshes, the per-op program). Plans with
    more stages are made by :func:`autopar.passes.plan_stages.plan_stages`, which calls
    this layer for each stage's program."""
    return plan_stage(Stage(range(cluster.world_size), "all"))


def pipeline_floor(work_s: float, world: int, p: int, m: int, dispatch_s: float = 0.0) -> float:
    """The least step any pipeline of ``p`` stages (one chunk per group of ``world / p``
    devices, as GPipe and 1F1B run) takes over ``m`` micro-batches, where its devices
    together compute for at least ``work_s`` device-seconds and each op costs a device that
    runs it its launch, ``dispatch_s`` for all of them (:func:`~autopar.cost.model.work_floor_s`).

    Stage s takes t_s a micro-batch (forward and backward) on its d = world / p devices:
    at least its share of the work over d plus its ops' launches, which add up over the
    stages to T = work_s / (m d) + dispatch_s. It cannot start the first forward before the
    stages ahead of it have passed it on, nor end before its last backward has gone back
    through them, and in between runs m of its own: step >= sum(t_r, r < s) + m t_s for
    every s. The most those bounds admit in a step of B has every one equal, t_s = B (1 -
    1/m)^s / m, adding up to B (1 - (1 - 1/m)^p): so B >= T / (1 - (1 - 1/m)^p). Uneven
    stages, transfers, the optimizer step and memory only add."""
    if m < 1 or p < 1:
        return 0.0
    per_stage = work_s / m / (world / p) + dispatch_s
    return per_stage / (1 - (1 - 1 / m) ** p)


# Stage counts a search tries beside one stage, at most.
MAX_STAGE_COUNTS = 1


def stage_counts(cluster, flat_plan, most: int | None = None) -> list:
    """The stage counts worth trying beside the plan of one stage (``flat_plan``, None where
    none fits): where the cluster has more than one node or kind of device, or where one
    stage's plan runs out of memory, recomputes, or runs micro-batches. On one node of one
    kind with memory to spare, splitting every op's work is what pays: stages would add a
    bubble and the values handed between them. The counts are those that cut the devices
    into equal groups of whole nodes or equal parts of a node, at most ``most`` (the
    program's layers, where known): a stage per node first, else the most stages of whole
    nodes each, then the fewest, :data:`MAX_STAGE_COUNTS` in all. A pinned ``pp`` plans any
    other count."""
    kinds = {n.device.name for n in cluster.nodes}
    binds = flat_plan is None or flat_plan.micro_batches > 1 or \
        any(c != "none" for c in flat_plan.recompute.values())
    if len(cluster.nodes) == 1 and len(kinds) == 1 and not binds:
        return []
    n = cluster.world_size
    top = n if most is None else min(n, most)
    counts = [p for p in range(2, top + 1) if n % p == 0 and groups_of(cluster, p) is not None]
    nodes = len(cluster.nodes)
    edges = set(_node_starts(cluster))

    def whole(p) -> bool:   # every group whole nodes
        return all(g * (n // p) in edges for g in range(p + 1))
    counts.sort(key=lambda p: (p != nodes, not whole(p), -p if whole(p) else p))
    return sorted(counts[:MAX_STAGE_COUNTS])


def groups_of(cluster, p: int) -> list | None:
    """The p groups of ranks a cluster cuts into: equal, each whole nodes or an equal part
    of one node; None where it does not cut so."""
    n = cluster.world_size
    if p < 1 or n % p:
        return None
    d = n // p
    starts = _node_starts(cluster)
    edges = set(starts)
    out = []
    for g in range(p):
        lo, hi = g * d, (g + 1) * d
        node = bisect.bisect_right(starts, lo) - 1
        if hi > starts[node + 1] and not (lo in edges and hi in edges):
            return None   # across nodes, but not whole ones
        out.append(range(lo, hi))
    return out


def _node_starts(cluster) -> list:
    """The first rank of every node, and the world size after them."""
    return list(itertools.accumulate((node.count for node in cluster.nodes), initial=0))
