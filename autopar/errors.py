"""Errors raised for user input. Each names the value involved and a remedy."""

from __future__ import annotations

import difflib


class AutoparError(Exception):
    """Base class of every error autopar raises on purpose."""


class PlanError(AutoparError, ValueError):
    """A plan cannot be made or used as asked (mesh, constraints, world size)."""


class NoFit(PlanError):
    """No plan fits the memory budget; ``smallest_bytes`` is the least any plan tried needs."""

    def __init__(self, message: str, smallest_bytes: float):
        super().__init__(message)
        self.smallest_bytes = smallest_bytes


class InputError(AutoparError, TypeError):
    """Inputs do not match what the module was planned for."""


class CaptureError(AutoparError, ValueError):
    """The program could not be captured as a graph."""


def closest(name: str, candidates, n: int = 3) -> str:
    """A short 'did you mean' list for an error message."""
    found = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.3)
    return ", ".join(repr(c) for c in found) if found else "none similar"
