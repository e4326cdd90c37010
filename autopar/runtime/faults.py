"""When one rank of a distributed run fails, the others stop with an error that names it; and
at start-up every rank checks that all of them planned alike.

Failures. A rank that fails inside autopar (planning in :func:`autopar.compile`, or the
forward, backward, step or gathers of a distributed :class:`~autopar.ParallelModule`)
records "where: ExceptionType: message" in the default process group's store, then raises
its own error unchanged. Every other rank is then in, or soon reaches, a collective that
fails: gloo raises when the failed rank's connections close (it exited) or when the group's
timeout passes (it lives on). That rank reads the record and raises
:class:`~autopar.errors.RankFailed` naming the failed rank and its error, in place of
gloo's "Timed out waiting 30000ms for recv operation". Where no rank recorded an error (a
rank called ``os._exit``, was killed, or failed outside autopar), it names the ranks that
recorded neither an error nor a failed collective of their own.

Epochs. Records are kept per epoch: each distributed build of a ParallelModule is one, the
same on every rank, and a compile that fails before its build uses up the epoch that build
would have had, so that every rank keeps the same count. An error that a program caught and
went past is never blamed for a later module's failure.

The plan check. When a ParallelModule is built, every rank puts its plan's fingerprint in
the store and waits, at most the group's timeout, until every rank has. Through the store,
not a collective: a rank that failed while planning is seen at once, not after the
timeout, and no collective of the program runs before the check passes. Ranks whose
fingerprints differ all stop with :class:`~autopar.errors.PlanMismatch`, naming the ranks
of each plan and the first field where two of the plans differ.

The normal path costs nothing per step: no collective and no store access, only a try
block around what may fail.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from .._torch import default_store
from ..errors import PlanMismatch, RankFailed

# How long a rank whose collective failed looks for the failed rank's record. A rank records
# before its connections close, so the record is there at once or never comes; this covers
# the store round trips of a loaded machine.
GRACE_S = 2.0
# The longest pause between two looks at the store while waiting.
POLL_S = 0.05
# How gloo says that a peer is gone or late (RuntimeErrors; checked with torch 2.13).
# Backends that raise torch.distributed.DistError (NCCL) need no text.
PEER_GONE = ("Timed out", "timed out", "Connection reset", "Connection closed",
             "Connection refused", "Broken pipe")
MESSAGE_CHARS = 2000

# The board of the current default process group and this process's epochs; a new group
# (destroy_process_group, then init_process_group) starts again from epoch 0.
_STATE = {"group": None, "board": None, "epoch": 0, "active": 0}


class Difference(NamedTuple):
    """The first field where two plans differ: its path and each plan's value there."""

    path: str
    first: Any
    second: Any


def check_same_plan(plan) -> int:
    """Wait until every rank of the default group has planned, and stop if a rank failed
    or planned differently; returns the epoch of the module being built.

    Raises RankFailed where a rank recorded a failure (or did not come within the group's
    timeout), PlanMismatch where the fingerprints differ.
    """
    board = _board()
    _STATE["epoch"] += 1
    board.check_same_plan(_STATE["epoch"], plan)
    return _STATE["epoch"]


def current_epoch() -> int:
    """The epoch of the last plan check (or failed compile) in this process."""
    return _STATE["epoch"]


def set_active(epoch: int) -> None:
    """The epoch of the module whose program runs now: backward's collectives look up
    failures there."""
    _STATE["active"] = epoch


def explain(error: Exception, where: str, epoch: int | None = None) -> Exception:
    """What this rank raises for ``error``, caught ``where`` ("in forward") at ``epoch`` (by
    default the epoch of the module that ran last).

    A collective that failed because another rank is gone or late gives RankFailed naming
    that rank; any other error is recorded for the other ranks and given back unchanged.
    Outside a process group, ``error``.
    """
    board = _board()
    if board is None or isinstance(error, (RankFailed, PlanMismatch)):
        return error
    epoch = _STATE["active"] if epoch is None else epoch
    if not _peer_gone(error):
        board.record(epoch, where, error)
        return error
    failure = board.blame(epoch, error)
    failure.__cause__ = error
    return failure


def guarded(where: str):
    """Decorates a ParallelModule method: in distributed mode (``self._epoch`` set) its
    errors go through :func:`explain`. Under torch.compile the method runs as it is: Dynamo
    traces it, and the compiled program's errors are the backend's own."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            if self._epoch is None or torch.compiler.is_compiling():
                return method(self, *args, **kwargs)
            try:
                return method(self, *args, **kwargs)
            except Exception as error:
                raise explain(error, where, self._epoch)  # noqa: B904 - explain chains it
        return run
    return wrap


@contextlib.contextmanager
def planning(distributed: bool):
    """Around a compile (planning, then the module's build): in distributed mode an error
    raised before the plan check is recorded where the other ranks, waiting in theirs, look
    for it, under the epoch that check would have used."""
    board = _board() if distributed else None
    if board is None:
        yield
        return
    start = _STATE["epoch"]
    try:
        yield
    except Exception as error:
        if _STATE["epoch"] == start:
            _STATE["epoch"] += 1
        raise explain(error, "while planning", _STATE["epoch"])  # noqa: B904


def first_difference(a, b, path: str = "") -> Difference | None:
    """The first leaf (in ``a``'s key order) where the JSON values ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            at = f"{path}[{key!r}]" if path else str(key)
            if key not in a or key not in b:
                return Difference(at, a.get(key, "(absent)"), b.get(key, "(absent)"))
            found = first_difference(a[key], b[key], at)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if a == b else Difference(path, a, b)


class _Board:
    """Failure records and plan fingerprints of the ranks of the default group, in its
    store under ``autopar/<epoch>/``."""

    def __init__(self):
        store = default_store()
        self.store = dist.PrefixStore("autopar", store)
        self.timeout_s = store.timeout.total_seconds()  # the group's, set by init
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.others = [r for r in range(self.size) if r != self.rank]

    def record(self, epoch: int, where: str, error: Exception) -> None:
        text = f"{where}: {type(error).__name__}: {error}"[:MESSAGE_CHARS]
        with contextlib.suppress(RuntimeError):  # no store (its host is gone): raise anyway
            self.store.set(f"{epoch}/failed/{self.rank}", text)
            self.store.add(f"{epoch}/failures", 1)

    def failures(self, epoch: int) -> dict:
        """Other rank -> what it recorded at ``epoch``."""
        if not self.store.add(f"{epoch}/failures", 0):
            return {}
        keys = {r: f"{epoch}/failed/{r}" for r in self.others}
        return {r: self.store.get(k).decode() for r, k in keys.items() if self.store.check([k])}

    def failed(self, failures: dict, at: str) -> RankFailed:
        rank = min(failures)
        also = sorted(failures)[1:]
        more = f" (and {_ranks(also)} recorded errors too)" if also else ""
        return RankFailed(f"rank {rank} failed {failures[rank]}{more}; rank {self.rank} "
                          f"stopped {at} instead of waiting for it", rank, failures[rank])

    def blame(self, epoch: int, error: Exception) -> RankFailed:
        """The error for a collective that failed at ``epoch`` because a peer is gone or
        late: the failure a peer recorded, else the ranks that recorded nothing."""
        try:
            self.store.set(f"{epoch}/stopped/{self.rank}", "1")
            failures = _poll(lambda: self.failures(epoch), GRACE_S)
            if failures:
                return self.failed(failures, "at a collective")
            silent = [r for r in self.others if not self.store.check([f"{epoch}/stopped/{r}"])]
        except RuntimeError:  # DistStoreError, DistNetworkError: the store is gone too
            return RankFailed(f"rank {self.rank} lost its peers ({_first_line(error)}) and "
                              "cannot reach the process group's store: the process hosting "
                              "it has most likely stopped (rank 0, where init_process_group "
                              "made the store; torchrun's agent hosts it elsewhere)")
        gloo = _first_line(error)
        if not silent:
            return RankFailed(f"every rank's collective failed and none recorded an error: "
                              f"{gloo}")
        who = f"rank {silent[0]}" if len(silent) == 1 else f"one of {_ranks(silent)}"
        return RankFailed(f"{who} stopped without recording an error (it exited, was killed, "
                          f"or failed outside autopar); rank {self.rank}'s collective failed: "
                          f"{gloo}", silent[0] if len(silent) == 1 else None)

    def check_same_plan(self, epoch: int, plan) -> None:
        mine = {"plan": plan.fingerprint(), "torch": torch.__version__}
        self.store.set(f"{epoch}/plan/{self.rank}", json.dumps(mine))
        keys = [f"{epoch}/plan/{r}" for r in range(self.size)]

        def everyone():
            failures = self.failures(epoch)
            if failures:
                raise self.failed(failures, "at the plan check")
            return self.store.check(keys)

        if not _poll(everyone, self.timeout_s):
            late = [r for r, k in enumerate(keys) if not self.store.check([k])]
            raise RankFailed(f"{_ranks(late)} did not reach the plan check within the process "
                             f"group's timeout ({self.timeout_s:g} s) and recorded no error; "
                             f"rank {self.rank} stopped instead of waiting longer",
                             late[0] if len(late) == 1 else None)
        every = {r: json.loads(self.store.get(k)) for r, k in enumerate(keys)}
        if len({v["plan"] for v in every.values()}) > 1:
            raise self.mismatch(epoch, plan, every)

    def mismatch(self, epoch: int, plan, every: dict) -> PlanMismatch:
        """The error when fingerprints differ: the ranks of each plan, and the first
        difference between rank 0's plan and the lowest rank's that differs from it."""
        prints = {r: v["plan"] for r, v in every.items()}
        other = next(r for r in range(self.size) if prints[r] != prints[0])
        if self.rank in (0, other):  # only these two publish their plans
            self.store.set(f"{epoch}/fields/{self.rank}", json.dumps(_fields(plan)))
        groups = {}
        for r, p in prints.items():
            groups.setdefault(p, []).append(r)
        text = "ranks derived different plans (" + "; ".join(
            f"plan {p} on {_ranks(rs)}" for p, rs in groups.items()) + ")"
        try:
            keys = [f"{epoch}/fields/0", f"{epoch}/fields/{other}"]
            self.store.wait(keys, timedelta(seconds=min(self.timeout_s, GRACE_S * 10)))
            d = first_difference(*(json.loads(self.store.get(k)) for k in keys))
            if d is not None:
                text += (f"; first difference: {d.path} is {_brief(d.first)} on rank 0, "
                         f"{_brief(d.second)} on rank {other}")
        except RuntimeError:  # rank 0 or ``other`` is gone: the fingerprints must do
            pass
        versions = {r: v["torch"] for r, v in every.items()}
        if len(set(versions.values())) > 1:
            text += "; torch versions differ: " + ", ".join(
                f"{v} on rank {r}" for r, v in versions.items())
        return PlanMismatch(text + ". Every rank must plan the same model, inputs, cluster and "
                            "options, with the same autopar and torch versions", prints)


def _board() -> _Board | None:
    """The board of the default process group, None where there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if _STATE["group"] is not dist.group.WORLD:
        _STATE.update(group=dist.group.WORLD, board=_Board(), epoch=0, active=0)
    return _STATE["board"]


def _peer_gone(error: Exception) -> bool:
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in PEER_GONE)


def _poll(probe, timeout_s: float):
    """``probe()`` until it returns something true or ``timeout_s`` pass; its last value."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        found = probe()
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(pause)
        pause = min(2 * pause, POLL_S)


def _fields(plan) -> dict:
    """The plan as :meth:`Plan.fingerprint` hashes it: without cost and statistics, each
    node by its op and layouts."""
    d = json.loads(plan.to_json(indent=None))
    d.pop("stats", None)
    d.pop("cost", None)
    d["nodes"] = {k: {"op": v["op"], "inputs": v["inputs"], "output": v["output"]}
                  for k, v in d["nodes"].items()}
    return d


def _ranks(ranks) -> str:
    ranks = list(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _brief(value, chars: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= chars else text[:chars - 3] + "..."


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
