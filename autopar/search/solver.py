r"""The exact planner: an integer program over every node's strategy, solved by HiGHS.

Variables
    x[v, s] in {0, 1}    node v takes strategy s (a layout for each input and its output)
    y[e, a, b] >= 0      edge e = (u -> v) carries producer layout a to consumer need b

Objective (seconds of one training step, forward and backward)
    minimize  sum_v sum_s  t[v, s] x[v, s]  +  sum_e sum_(a,b)  c[e, a, b] y[e, a, b]

    t[v, s]: compute of v's local share (roofline), the optimizer step over a parameter's
    shard, and for graph outputs the move back to replicated; c[e, a, b]: the collectives of
    the redistribution table moving a to b, both directions, plus the gradient sums b implies.

Constraints
    one_strategy_per_node   sum_s x[v, s] = 1                                  for every v
    edge_marginals          sum_b y[e, a, b] = sum_{s : out(s) = a} x[u, s]     for every e, a
                            sum_a y[e, a, b] = sum_{s : need(s) = b} x[v, s]    for every e, b
    memory_budget           sum_v sum_s m_t[v, s] x[v, s] <= budget            for checkpoints t
    fixed_choices           pinned parameters keep their one layout (their x is fixed)

    Folding: only the first instance of each repeated block has variables; it stands for
    every instance (its t and the c of its edges count once per instance, and memory is
    counted as in the last instance, where it peaks), so the program grows with the number
    of distinct blocks, not with depth.

    With x integral each marginal has a single 1, so y is the indicator of the pair actually
    used: y stays continuous and the edge cost is exactly linear. m_t[v, s] counts, after
    node t of the forward pass, parameter storage (with gradients and optimizer states),
    activations saved for backward, and outputs still to be read.

Solving: the relaxation first, which is the optimum where it is integral (most programs
here). Where memory binds it is fractional, and its support (the few strategies it mixes at
some nodes, every other node's one) is then solved as an integer program to its end: a plan
not proven optimal, but one that does not depend on how far branch and bound on the whole
program got before a time limit.

The same inputs always give the same plan: variables are laid out in graph order and HiGHS
runs single-threaded with a fixed seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_array

from ..cost.model import BUCKET_BYTES
from ..errors import PlanError
from .highs import Program, Solution, run
from .problem import _ALWAYS
from .result import HINTED, SUPPORT, TIME_LIMITED

TIME_LIMIT_S = 60.0
# The smallest memory any assignment needs, solved only to say so in an error: past this,
# the relaxation's bound (no assignment needs less) is what the error reports.
MESSAGE_TIME_LIMIT_S = 2.0
MEMORY_UNIT = float(2**30)  # bytes per unit of the memory rows
INTEGRAL_TOLERANCE = 1e-7   # a relaxed binary this close to 0 or 1 counts as integral


class _Builder:
    """Columns and rows of the program, added a family at a time as numpy blocks."""

    def __init__(self):
        self._cost, self._integral, self._upper = [], [], []
        self._rows, self._cols, self._vals, self._lo, self._hi = [], [], [], [], []
        self._extra = []          # (columns, seconds) added to columns already made
        self.n_cols = self.n_rows = 0
        self._lp = None           # the program, once made

    def columns(self, cost, integral: bool, upper: float = 1.0) -> np.ndarray:
        """New columns of these costs; their indices."""
        cost = np.asarray(cost, dtype=float)
        self._cost.append(cost)
        self._integral.append(np.full(len(cost), 1 if integral else 0, dtype=np.uint8))
        self._upper.append(np.full(len(cost), upper))
        self.n_cols += len(cost)
        return np.arange(self.n_cols - len(cost), self.n_cols)

    def var(self, cost: float, integral: bool, upper: float = 1.0) -> int:
        return int(self.columns([cost], integral, upper)[0])

    def add_cost(self, cols, seconds):
        """Add ``seconds`` to the cost of existing columns ``cols``."""
        self._extra.append((np.asarray(cols), np.asarray(seconds, dtype=float)))

    def rows(self, count: int, rows, cols, vals, lo, hi):
        """``count`` new rows with entries (row within them, column, value), zeros dropped;
        bounds ``lo`` and ``hi`` (scalars or one per row)."""
        rows, cols, vals = np.asarray(rows), np.asarray(cols), np.asarray(vals, dtype=float)
        keep = vals != 0
        self._rows.append(rows[keep] + self.n_rows)
        self._cols.append(cols[keep])
        self._vals.append(vals[keep])
        self._lo.append(np.broadcast_to(np.asarray(lo, dtype=float), (count,)))
        self._hi.append(np.broadcast_to(np.asarray(hi, dtype=float), (count,)))
        self.n_rows += count

    def row(self, terms: dict, lo: float, hi: float):
        self.rows(1, np.zeros(len(terms), dtype=int), list(terms), list(terms.values()), lo, hi)

    @property
    def integral(self) -> np.ndarray:
        return _join(self._integral, np.uint8)

    def _program(self) -> "Program":
        """The program, made once all its columns and rows are added."""
        if self._lp is None:
            self._lp = self._make()
        return self._lp

    def _make(self) -> "Program":
        cost = _join(self._cost, float)
        for cols, seconds in self._extra:
            np.add.at(cost, cols, seconds)
        a = coo_array((_join(self._vals, float), (_join(self._rows, int), _join(self._cols, int))),
                      shape=(self.n_rows, self.n_cols)).tocsc()
        return Program(cost, _join(self._upper, float), _join(self._lo, float),
                        _join(self._hi, float), a.indptr.astype(np.int32),
                        a.indices.astype(np.int32), a.data)

    def relax(self, time_limit_s: float, cutoff: float = np.inf) -> Solution:
        """The relaxation (every binary continuous in [0, 1]). Where its optimum is already
        integral (most programs here: every node's choice is a vertex of its simplex) it is
        the integer optimum, and HiGHS's branch and bound setup costs more than the
        relaxation itself. It bounds the integer optimum from below: HiGHS's dual simplex
        stops as soon as its (dual) objective, a lower bound all along, passes ``cutoff``
        (:class:`Dominated`)."""
        # without presolve: HiGHS's dual simplex is 2-3x faster on these programs
        relaxed = run(self._program(), time_limit_s, presolve=False, objective_bound=cutoff)
        if relaxed.status == "bound" or relaxed.x is not None and relaxed.fun > cutoff:
            raise Dominated(relaxed.fun)
        return relaxed

    def is_integral(self, res: Solution) -> bool:
        """Whether ``res`` sets every binary to 0 or 1 (rounding them if so)."""
        if res.x is None:
            return False
        ints = self.integral == 1
        xs = res.x[ints]
        if np.all(np.minimum(np.abs(xs), np.abs(xs - 1)) <= INTEGRAL_TOLERANCE):
            res.x[ints] = np.round(xs)
            return True
        return False

    def branch(self, time_limit_s: float, support=None, whole: bool = True) -> Solution:
        """The integer program by HiGHS's branch and bound.

        Given ``support`` (per column, above zero where it may be used: the relaxation's
        values, after :meth:`relax`), only the binaries it keeps stay free: a few nodes are
        left to choose, so the program is small and solved to its end in well under a
        second on the programs here, and the same inputs give the same plan (branch and
        bound on the whole program, where memory binds, runs into its time limit, and what
        it has by then depends on the machine's speed). With ``whole``, the whole program
        is branched on where the restricted one has no plan."""
        integrality = self.integral
        lp = self._program()
        if support is not None:
            upper = np.where((integrality == 1) & (support <= INTEGRAL_TOLERANCE), 0.0,
                             lp.upper)
            res = run(lp, time_limit_s, presolve=True, integrality=integrality, upper=upper)
            res.restricted = bool(np.any(upper != lp.upper))
            if res.x is not None or not whole:
                return res
        return run(lp, time_limit_s, presolve=True, integrality=integrality)


def _join(parts: list, dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def strategy_variables(b: _Builder, prob) -> dict:
    """x[v, s]: one binary per strategy of every node that has a choice; its cost counts
    once per instance the node stands for."""
    x = {}
    for n in prob.nodes:
        if len(prob.options[n]) > 1:
            x[n] = b.columns(prob.weight.get(n, 1) * np.asarray(prob.node_s[n]), True)
    return x


def one_strategy_per_node(b: _Builder, prob, x: dict):
    if not x:
        return
    cols = list(x.values())
    rows = np.repeat(np.arange(len(cols)), [len(c) for c in cols])
    b.rows(len(cols), rows, np.concatenate(cols), np.ones(len(rows)), 1.0, 1.0)


def edge_marginals(b: _Builder, prob, x: dict, pairs: dict) -> float:
    """y[e, a, b] for edges with a choice on both sides (into ``pairs``: edge index ->
    (columns, a, b)); edges with one side fixed fold their cost into the other side's x.
    Returns the constant cost of fully fixed edges."""
    constant = 0.0
    for k, e in enumerate(prob.edges):
        src_free, dst_free = e.src in x, e.dst in x
        if not src_free and not dst_free:
            constant += e.seconds(0, 0)
        elif not dst_free:
            b.add_cost(x[e.src], [e.seconds(s, 0) for s in range(len(x[e.src]))])
        elif not src_free:
            b.add_cost(x[e.dst], [e.seconds(0, s) for s in range(len(x[e.dst]))])
        else:
            pairs[k] = _pair_variables(b, e, x)
    return constant


def _pair_variables(b: _Builder, e, x: dict, seconds: bool = True) -> tuple:
    """y for every pair of distinct (producer layout, consumer need) of edge ``e`` whose
    cost is finite, and the rows tying them to both ends' x; (their columns, and per
    column its distinct producer and consumer key). Without ``seconds`` they cost nothing."""
    src, src_of, dst, dst_of = e.distinct
    cost = e.key_matrix()
    finite = np.isfinite(cost)
    i, j = np.nonzero(finite)
    pairs = b.columns(e.weight * cost[finite] if seconds else np.zeros(len(i)), False)
    na, nb = len(src), len(dst)
    xs, xd = x[e.src], x[e.dst]
    rows = np.concatenate([i, na + j, src_of, na + dst_of])
    cols = np.concatenate([pairs, pairs, xs, xd])
    vals = np.concatenate([np.ones(2 * len(pairs)), -np.ones(len(xs) + len(xd))])
    b.rows(na + nb, rows, cols, vals, 0.0, 0.0)
    return pairs, i, j


def memory_floor(prob) -> float:
    """Bytes no assignment of ``prob`` goes below at its peak: :func:`memory_budget`'s
    floor, without building the program (the copy an edge between two free nodes saves at
    its least, none). Above the budget, nothing fits: the program need not be built, nor
    any plan searched for."""
    x = {n: np.arange(len(prob.options[n])) for n in prob.nodes
         if len(prob.options[n]) > 1}
    return float(memory_budget(None, prob, x, np.inf, {}).max())


def memory_budget(b: _Builder | None, prob, x: dict, budget_bytes: float, pairs: dict,
                  peak_col: int | None = None):
    """Memory after each checkpoint stays within the budget (or below ``peak_col``).

    Returns, per row, bytes no assignment (integral or not) goes below: the rows' constant
    plus, for every term, the least it takes over its strategies (or edge pairs), each a
    set of columns summing to one. Above the budget anywhere, nothing fits (no solve
    needed to know it). Without ``b`` only that is found (:func:`memory_floor`)."""
    points = np.array(prob.checkpoints())
    constant = np.zeros(len(points))
    floor = np.zeros(len(points))     # the least of each term, added up
    rows, cols, vals = [], [], []

    def hold(start, end, columns, v):
        """``v`` (per column of ``columns``, or a constant where ``columns`` is None) from
        the checkpoint at ``start`` up to ``end``."""
        first, last = np.searchsorted(points, [start, end])
        if first >= last:
            return
        if columns is None:
            constant[first:last] += v
            return
        floor[first:last] += np.min(v)
        if b is None:
            return
        nz = np.nonzero(v)[0]
        if not len(nz):
            return
        span = np.arange(first, last)
        if len(nz) > 1 and len(span) > 1:
            # a term over many strategies held at many checkpoints: one column for its
            # bytes (in GiB, as the rows), defined once, read at each checkpoint; the rows
            # stay sparse (a saved edge's pairs times the checkpoints it spans, otherwise)
            total = b.var(0.0, False, upper=np.inf)
            b.rows(1, np.zeros(len(nz) + 1, dtype=int), np.append(columns[nz], total),
                   np.append(v[nz] / MEMORY_UNIT, -1.0), 0.0, 0.0)
            columns, v, nz = np.array([total]), np.array([MEMORY_UNIT]), np.array([0])
        rows.append(np.repeat(span, len(nz)))
        cols.append(np.tile(columns[nz], len(span)))
        vals.append(np.tile(v[nz], len(span)))

    for h in prob.held:
        per = getattr(prob, h.table)[h.node]
        if h.node not in x:
            hold(h.start, h.end, None, h.mult * per[0])
        else:
            hold(h.start, h.end, x[h.node], h.mult * np.asarray(per))
    for k, e in enumerate(prob.edges):
        if not e.saved_bytes:
            continue
        if k in pairs:
            columns, i, j = pairs[k]
            per = e.saved_matrix(prob.prices)[i, j]
        elif b is None and e.src in x and e.dst in x:
            continue   # (at its least, none: the consumer takes the value as it is made)
        elif e.src in x:   # (the entries read only: the whole matrix may be large)
            columns = x[e.src]
            per = np.array([e.saved_at(prob.prices, s, 0) for s in range(len(columns))])
        elif e.dst in x:
            columns = x[e.dst]
            per = np.array([e.saved_at(prob.prices, 0, d) for d in range(len(columns))])
        else:
            columns, per = None, e.saved_at(prob.prices, 0, 0)
        for start, mult in e.spans:
            hold(start, _ALWAYS, columns, mult * per)
    # late in backward (Problem.memory_after_backward), two points: the first block
    # recomputed while the gradients wait for their buckets, and the very end, the last
    # bucket's copy made (its share at most a bucket, as if full)
    late = len(points)
    after = len(prob.nodes)   # positions past every node: rows late and late + 1
    points, constant = np.append(points, [after, after + 1]), np.append(constant, [0.0, 0.0])
    floor = np.append(floor, [0.0, 0.0])
    most = sum(prob.weight.get(n, 1) * max(v) for n, v in prob.sync_bytes.items())
    constant[late + 1] += min(BUCKET_BYTES, most)
    for h in prob.held:
        if h.table in ("static_bytes", "transient_bytes", "caller_bytes"):
            per = getattr(prob, h.table)[h.node]
            end = after + 1 if h.table == "transient_bytes" else _ALWAYS   # (transient: late)
            hold(after, end, x.get(h.node), h.mult * (np.asarray(per) if h.node in x
                                                      else per[0]))
    for n, v in prob.sync_bytes.items():
        w = prob.weight.get(n, 1)
        hold(after, _ALWAYS, x.get(n), w * (np.asarray(v) if n in x else v[0]))
    if b is None:
        return constant + floor
    # in GiB: HiGHS's branch and bound misjudges feasibility with coefficients in bytes
    vals = [v / MEMORY_UNIT for v in vals]
    if peak_col is not None:   # (the peak in GiB too)
        rows.append(np.arange(len(points)))
        cols.append(np.full(len(points), peak_col))
        vals.append(-np.ones(len(points)))
        hi = -constant / MEMORY_UNIT
    else:
        hi = (budget_bytes - constant) / MEMORY_UNIT
    b.rows(len(points), _join(rows, int), _join(cols, int), _join(vals, float), -np.inf, hi)
    return constant + floor


def fixed_choices(prob) -> dict:
    """Nodes with a single admissible strategy (pinned parameters among them) need no
    variable: their choice is index 0."""
    return {n: 0 for n in prob.nodes if len(prob.options[n]) == 1}


@dataclass
class Solved:
    """What :func:`solve` found: the assignment (node -> strategy index), the program's
    objective (seconds); where memory binds, the shares at which the relaxation splits the
    instances a node stands for between strategies (:func:`split_shares`) and the
    strategies it uses per node (its support)."""

    choice: dict
    objective: float
    shares: tuple = ()
    support: dict | None = None
    # seconds no assignment of the program is below (None: nothing proved), and the steps
    # that made the plan not the proven optimum (its search restricted; empty where exact)
    bound: float | None = None
    restricted: tuple = ()


def solve(prob, budget_bytes: float, time_limit_s: float = TIME_LIMIT_S,
          cutoff: float = np.inf, hint=None) -> Solved:
    """The optimal assignment within the memory budget. Raises :class:`Dominated` when
    every assignment costs more than ``cutoff`` seconds (another mesh's plan), without
    solving to the end.

    Where the relaxation is fractional (memory binds), the plan is the best among the
    strategies the relaxation uses (:meth:`_Builder.branch`): not proven optimal, its
    objective is within the relaxation's bound plus the gap between the two. ``hint``
    (node -> the strategies it may use, or None) stands in for that support without
    solving the relaxation (a refinement of a program whose relaxation is known); the
    relaxation is solved after all where no plan uses only those."""
    b, x, constant = _step_program(prob, budget_bytes, time_limit_s)
    if hint is not None:
        res = b.branch(time_limit_s, _hinted(prob, x, hint, b.n_cols), whole=False)
        if res.x is not None:
            return Solved(_choice(prob, x, res), float(res.fun) + constant,
                          restricted=(HINTED,))
    try:
        relaxed = b.relax(time_limit_s, cutoff - constant)
    except Dominated as e:
        raise Dominated(e.bound + constant) from None
    if relaxed.status == "infeasible":  # the relaxation is infeasible: so is the program
        raise Infeasible(prob, time_limit_s)
    res, shares, support, steps = relaxed, (), None, ()
    if not b.is_integral(relaxed):
        if relaxed.x is not None:
            shares = split_shares(prob, x, relaxed.x)
            support = {n: {prob.options[n][i] for i in np.nonzero(
                relaxed.x[cols] > INTEGRAL_TOLERANCE)[0]} for n, cols in x.items()}
        res = b.branch(time_limit_s, support=relaxed.x)
        steps = (SUPPORT,) if res.restricted else ()
        if res.status != "optimal":
            steps += (TIME_LIMITED,)
    if res.x is None:
        raise Infeasible(prob, time_limit_s)
    bounds = [v for v in (relaxed.bound, None if res.restricted else res.bound)
              if v is not None]
    bound = max(bounds) + constant if bounds else None
    return Solved(_choice(prob, x, res), float(res.fun) + constant, shares, support,
                  bound, steps)


def _step_program(prob, budget_bytes: float, time_limit_s: float) -> tuple:
    """(builder, strategy columns per node, constant seconds) of the program :func:`solve`
    solves: each node's strategy, the edges' pairs, the memory budget. Raises
    :class:`Infeasible` where the budget is below what every assignment holds somewhere."""
    b = _Builder()
    x = strategy_variables(b, prob)
    one_strategy_per_node(b, prob, x)
    pairs = {}
    constant = edge_marginals(b, prob, x, pairs)
    constant += sum(prob.weight.get(n, 1) * prob.node_s[n][0] for n in prob.nodes if n not in x)
    least = memory_budget(b, prob, x, budget_bytes, pairs)
    if least.max() > budget_bytes * (1 + 1e-9):
        raise Infeasible(prob, time_limit_s)
    return b, x, constant


def relaxation_bound(prob, budget_bytes: float, time_limit_s: float) -> float | None:
    """Seconds no assignment of ``prob`` within ``budget_bytes`` steps below: its
    relaxation's optimum, or None where that is not found within ``time_limit_s``."""
    b, _, constant = _step_program(prob, budget_bytes, time_limit_s)
    relaxed = b.relax(time_limit_s)
    return None if relaxed.bound is None else relaxed.bound + constant


def _choice(prob, x: dict, res: Solution) -> dict:
    choice = fixed_choices(prob)
    for n, cols in x.items():
        choice[n] = int(np.argmax(res.x[cols]))
    return choice


def _hinted(prob, x: dict, hint, n_cols: int) -> np.ndarray:
    """Per column 1 where ``hint`` lets its node use its strategy, else 0; a node the hint
    leaves no strategy of keeps them all."""
    allowed = np.zeros(n_cols)
    for n, cols in x.items():
        ok = hint(n)
        keep = [i for i, s in enumerate(prob.options[n]) if ok is None or s in ok]
        allowed[cols[keep] if keep else cols] = 1.0
    return allowed


def split_shares(prob, x: dict, values) -> tuple:
    """Where memory binds, the relaxation of a folded program may give a node standing for
    several instances one strategy in part and another in the rest (as OSDP shards some
    layers only): those parts, most common first. Cutting the instances there is the
    program worth solving next."""
    count = {}
    for n, cols in x.items():
        if prob.weight.get(n, 1) < 2:
            continue
        for c in cols:
            share = round(float(values[c]), 2)
            if 0 < share < 1:   # (a share within 0.005 of either end cuts off nothing)
                count[share] = count.get(share, 0) + 1
    return tuple(sorted(count, key=lambda f: (-count[f], f)))


def min_memory(prob, time_limit_s: float = TIME_LIMIT_S) -> float:
    """The smallest peak memory per device any assignment on this mesh reaches."""
    b = _Builder()
    x = strategy_variables(b, prob)
    b._cost = [np.zeros(len(c)) for c in b._cost]
    peak = b.var(1.0, False, upper=np.inf)
    one_strategy_per_node(b, prob, x)
    # edges impose no cost here, but tuple edges still forbid some pairs, and a consumer's
    # copy of a parameter depends on both ends
    pairs = {}
    for k, e in enumerate(prob.edges):
        if e.src in x and e.dst in x and (e.cost.forbids or e.saved_bytes):
            pairs[k] = _pair_variables(b, e, x, seconds=False)
    memory_budget(b, prob, x, 0.0, pairs, peak_col=peak)
    relaxed = res = b.relax(time_limit_s)
    if not b.is_integral(res) and res.status != "infeasible":
        res = b.branch(time_limit_s)
    if res.status != "optimal" and relaxed.x is not None:
        # not proven the least within the time limit: the relaxation's peak, a bound no
        # assignment goes below (an assignment found by then may need more than the least)
        return float(relaxed.x[peak]) * MEMORY_UNIT
    if res.x is None:
        raise PlanError("no layout assignment exists for this program on this mesh")
    return float(res.x[peak]) * MEMORY_UNIT


class Infeasible(Exception):
    """No assignment fits. ``min_bytes``, the smallest memory any assignment needs, is
    solved for only when asked: it takes a second program, and is only reported when no
    mesh at all fits."""

    def __init__(self, prob, time_limit_s: float = TIME_LIMIT_S):
        super().__init__("no assignment fits in memory")
        self.prob, self.time_limit_s = prob, time_limit_s

    @functools.cached_property
    def min_bytes(self) -> float:
        return min_memory(self.prob, min(self.time_limit_s, MESSAGE_TIME_LIMIT_S))


class Dominated(Exception):
    """Every assignment costs at least ``bound`` seconds, no less than a plan in hand."""

    def __init__(self, bound: float):
        super().__init__(bound)
        self.bound = bound

