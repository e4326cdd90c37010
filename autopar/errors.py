"""Errors raised for user input. Each names the value involved and a remedy."""

from __future__ import annotations

import difflib
import functools

from .units import format_bytes


class AutoparError(Exception):
    """Base class of every error autopar raises on purpose."""


class PlanError(AutoparError, ValueError):
    """A plan cannot be made or used as asked (mesh, constraints, world size)."""


class NoFit(PlanError):
    """No plan fits ``budget_bytes`` per device on ``cluster``; ``smallest_bytes`` is what
    every plan tried needs at least (the least one needs, where proven in time), ``tried``
    what the search did beyond one micro-batch without recomputation ("every block
    recomputed in full", ...).

    ``smallest_bytes`` may be given as a function: it takes a program of its own per mesh to
    find, and a search that goes on to other choices (more recomputation, more micro-batches)
    never asks for it."""

    def __init__(self, budget_bytes: float, cluster, smallest_bytes, level: str = "full",
                 tried: tuple = (), note: str = ""):
        super().__init__()
        self.budget_bytes, self.cluster, self.level = budget_bytes, cluster, level
        self.tried, self.note = tuple(tried), note
        self._smallest = smallest_bytes

    @functools.cached_property
    def smallest_bytes(self) -> float:
        s = self._smallest
        return float(s() if callable(s) else s)

    def __str__(self) -> str:
        budget, smallest = format_bytes(self.budget_bytes), format_bytes(self.smallest_bytes)
        if self.smallest_bytes <= self.budget_bytes and self.level == "fast":
            text = (f"level='fast' found no plan that fits in {budget} per device on "
                    f"{self.cluster}, though plans needing {smallest} exist: plan with "
                    "level='full' (the exact program keeps to the budget)")
        else:
            even = f", even with {' and '.join(self.tried)}" if self.tried else ""
            text = (f"no plan fits in {budget} per device on {self.cluster}{even}: "
                    f"every plan needs at least {smallest}. Add devices, store parameters "
                    "split with storage= (a parameter pinned in constraints= is stored as it "
                    "is used unless storage= says otherwise), lower the batch size, or raise "
                    "memory_budget_bytes")
        return text + (f". {self.note}" if self.note else "")

    def having_tried(self, what: str = "", note: str = "") -> "NoFit":
        """This error after a search that also tried ``what``, with ``note`` added."""
        return NoFit(self.budget_bytes, self.cluster, lambda: self.smallest_bytes, self.level,
                     self.tried + ((what,) if what else ()), note or self.note)


class NotFaster(PlanError):
    """A choice the search tried (a pipeline of some stages) is predicted slower than the
    best plan it already has: it is not planned further."""


class InputError(AutoparError, TypeError):
    """Inputs do not match what the module was planned for."""


class CaptureError(AutoparError, ValueError):
    """The program could not be captured as a graph."""


class PlanMismatch(PlanError):
    """Ranks derived different plans: ``fingerprints`` maps each rank to its plan's
    fingerprint; the message names the first field that differs, where it was found."""

    def __init__(self, message: str, fingerprints: dict):
        super().__init__(message)
        self.fingerprints = dict(fingerprints)


class RankFailed(AutoparError, RuntimeError):
    """Another rank failed, and this one stopped instead of waiting for it.

    ``failed_rank`` is the rank that failed (None where no rank recorded an error and more
    than one may have stopped), ``reason`` what it recorded ("in forward: ValueError: ...",
    "" where it recorded nothing: it exited or was killed)."""

    def __init__(self, message: str, failed_rank: int | None = None, reason: str = ""):
        super().__init__(message)
        self.failed_rank, self.reason = failed_rank, reason


def closest(name: str, candidates, n: int = 3) -> str:
    """A short 'did you mean' list for an error message."""
    found = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.3)
    return ", ".join(repr(c) for c in found) if found else "none similar"
