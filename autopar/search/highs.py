"""HiGHS as the planner runs it: a program in, a :class:`Solution` out, quietly,
single-threaded with its fixed seed, its log on the "autopar.search.solver" logger where
asked; and the turns planning threads take at Python while their solves overlap
(:data:`TURNS`)."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

import highspy
import numpy as np

@dataclass
class Program:
    """The program as HiGHS takes it: columns (cost, upper bound; lower bounds are 0), row
    bounds, and the constraint matrix column by column."""

    cost: np.ndarray
    upper: np.ndarray
    row_lower: np.ndarray
    row_upper: np.ndarray
    start: np.ndarray
    index: np.ndarray
    value: np.ndarray


@dataclass
class Solution:
    """What HiGHS returned: ``status`` "optimal", "infeasible", "bound" (the dual objective
    passed the bound asked for), "limit" (time) or "other"; ``x`` where it has a feasible
    point; ``fun`` its objective (at "bound", the dual objective reached); ``bound`` what
    HiGHS proved no point is below: an integer program's dual bound, a relaxation's optimum
    (None where it proved nothing)."""

    status: str
    x: np.ndarray | None
    fun: float | None
    bound: float | None = None
    restricted: bool = False   # solved with some columns held at 0 (the bound is theirs)


_COLUMNWISE, _MINIMIZE = int(highspy.MatrixFormat.kColwise), int(highspy.ObjSense.kMinimize)
_STATUS = {highspy.HighsModelStatus.kOptimal: "optimal",
           highspy.HighsModelStatus.kInfeasible: "infeasible",
           highspy.HighsModelStatus.kUnboundedOrInfeasible: "infeasible",
           highspy.HighsModelStatus.kObjectiveBound: "bound",
           highspy.HighsModelStatus.kTimeLimit: "limit"}


def run(lp: Program, time_limit_s: float, presolve: bool, objective_bound: float = np.inf,
         integrality=None, upper=None) -> Solution:
    """Solve ``lp`` with HiGHS, quietly, single-threaded with its fixed seed; ``integrality``
    (1 for an integer column) makes it an integer program, ``upper`` replaces its columns'
    upper bounds."""
    n_cols, n_rows = len(lp.cost), len(lp.row_lower)
    if n_cols == 0:  # rows without entries: feasible if 0 is within every row's bounds
        ok = np.all(lp.row_lower <= 0) and np.all(lp.row_upper >= 0)
        return Solution("optimal" if ok else "infeasible", np.zeros(0) if ok else None, 0.0,
                        0.0 if ok else None)
    h = _highs()
    h.setOptionValue("threads", 1)
    h.setOptionValue("time_limit", float(time_limit_s))
    h.setOptionValue("presolve", "on" if presolve else "off")
    if np.isfinite(objective_bound):
        h.setOptionValue("objective_bound", float(objective_bound))
    kinds = np.zeros(n_cols, np.int32) if integrality is None else integrality.astype(np.int32)
    h.passModel(n_cols, n_rows, len(lp.value), _COLUMNWISE, _MINIMIZE, 0.0, lp.cost,
                np.zeros(n_cols), lp.upper if upper is None else upper, lp.row_lower,
                lp.row_upper, lp.start, lp.index, lp.value, kinds)
    with TURNS.native():
        h.run()
    info = h.getInfo()
    feasible = info.primal_solution_status == _FEASIBLE
    status = _STATUS.get(h.getModelStatus(), "other")
    if integrality is not None:
        bound = float(info.mip_dual_bound)
        bound = bound if np.isfinite(bound) else None
    else:
        bound = float(info.objective_function_value) if status in ("optimal", "bound") \
            else None
    return Solution(status, np.array(h.getSolution().col_value) if feasible else None,
                    float(info.objective_function_value), bound)


_FEASIBLE = 2   # HiGHS's kSolutionStatusFeasible

_LOG = logging.getLogger("autopar.search.solver")


def solver_log_enabled() -> bool:
    """Whether HiGHS's log is written: only while the "autopar" logger (of which
    "autopar.search.solver" is a child) takes DEBUG records, one per line of the log."""
    return _LOG.isEnabledFor(logging.DEBUG)


def _highs():
    """A HiGHS instance writing nothing to the console; with :func:`solver_log_enabled`, its
    log goes to the "autopar.search.solver" logger. HiGHS prints its banner once per process, as the
    first instance is made and before an option can be set (highspy 1.16): that first one is
    made with the process's stdout and stderr pointed at /dev/null."""
    if not _BANNER_SHOWN.is_set():
        with _BANNER_LOCK:
            if not _BANNER_SHOWN.is_set():
                with _silenced_fds():
                    highspy.Highs()
                _BANNER_SHOWN.set()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    if solver_log_enabled():
        h.setCallback(_log_line, None)
        h.startCallback(highspy.cb.HighsCallbackType.kCallbackLogging)
        h.setOptionValue("log_to_console", False)
        h.setOptionValue("output_flag", True)
    return h


_BANNER_LOCK = threading.Lock()
_BANNER_SHOWN = threading.Event()


@contextlib.contextmanager
def _silenced_fds():
    """File descriptors 1 and 2 on /dev/null for the duration (what C code writes, too)."""
    import os
    import sys
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(null, fd)
        yield
    finally:
        for fd, keep in zip((1, 2), saved):
            os.dup2(keep, fd)
            os.close(keep)
        os.close(null)


def _log_line(callback_type, message: str, data_out, data_in, user_data):
    if message.strip():
        _LOG.debug("HiGHS: %s", message.rstrip("\n"))


class Turns:
    """Lets planning threads take turns at Python while their HiGHS runs overlap.

    HiGHS releases the GIL while it solves; a thread planning in :meth:`python` holds this
    lock all the time it runs Python (so the caches its problems share see one writer at a
    time, each step done whole) and lets it go only while HiGHS solves (:meth:`native`),
    when the next thread builds its program."""

    def __init__(self):
        self._lock, self._local = threading.Lock(), threading.local()

    @contextlib.contextmanager
    def python(self):
        with self._lock:
            self._local.held = True
            try:
                yield
            finally:
                self._local.held = False

    @contextlib.contextmanager
    def native(self):
        if not getattr(self._local, "held", False):
            yield
            return
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()


TURNS = Turns()


__all__ = ["Program", "Solution", "run", "solver_log_enabled", "TURNS", "Turns"]
