"""Micro-batches as a layer of the search: how many the global batch runs as.

The rewrite of a step into the program of one micro-batch is the pass
:func:`autopar.passes.split_micro_batches.split_micro_batches`; this layer chooses the count.
"""

from __future__ import annotations

import torch

from ..errors import NoFit, NotFaster, PlanError

# Micro-batch counts planned past the first that fits, while each is faster than the last.
MAX_MORE_COUNTS = 2


def choose_micro_batches(plan_at, batch_size: int | None):
    """The plan of the micro-batch count that steps fastest within memory: ``plan_at(m)``
    plans the step run as m micro-batches, returning what it made with its ``.plan``, or
    raises :class:`~autopar.errors.NoFit`.

    Only where memory binds: one micro-batch first; where its plan recomputes activations, or
    no plan fits, the divisors of the batch after it in order, each searched with its own
    recompute choices, stopping at a count whose plan recomputes nothing (more would only add
    time), at one slower than the best so far, or :data:`MAX_MORE_COUNTS` counts past the
    first that fits. A step that cannot be split
    (:func:`~autopar.passes.split_micro_batches.check_splittable`) keeps one."""
    try:
        best = plan_at(1)
    except NoFit as e:
        best, error = None, e
    if best is not None and not _recomputes(best.plan):
        return best
    more = divisors(batch_size)[1:] if batch_size else []
    fits = 0
    for m in more:
        try:
            found = plan_at(m)
        except NoFit as e:
            error = e
            continue
        except PlanError as e:   # the step does not split into micro-batches
            if best is None:
                raise error.having_tried(note=f"Micro-batches cannot help: {_first_line(e)}") \
                    from None
            return best
        fits += 1
        if best is not None and found.plan.cost.total_s >= best.plan.cost.total_s:
            return best
        best = found
        if not _recomputes(best.plan) or fits > MAX_MORE_COUNTS:
            return best
    if best is None:
        raise error.having_tried(f"micro-batches of one sample ({batch_size} a step)") \
            if more else error
    return best


def choose_pipeline_micro_batches(plan_at, batch_size: int | None, stages: int):
    """The fastest plan of a pipeline of ``stages`` over the micro-batch counts worth
    trying: the fewest at least the stages (fewer leave stages idle) and the fewest at least
    four times the stages (a bubble of at most a fifth of 1F1B's step), where the batch
    divides so; the largest count where neither is (:func:`pipeline_counts`)."""
    return fastest([lambda best, m=m: plan_at(m) for m in pipeline_counts(batch_size, stages)],
                   skip=(NoFit, NotFaster))


def pipeline_counts(batch_size: int | None, stages: int) -> list:
    """The micro-batch counts :func:`choose_pipeline_micro_batches` tries for ``stages``."""
    every = divisors(batch_size or 1)
    counts = []
    for least in (stages, 4 * stages):
        found = next((d for d in every if d >= least), None)
        if found is not None and found not in counts:
            counts.append(found)
    return counts or [every[-1]]


def fastest(attempts, best=None, error=None, skip=(NoFit,), ignore=()):
    """The fastest within memory of ``best`` and what each of ``attempts`` makes (called
    with the best so far): one raising an error of ``skip`` is passed over and its error
    kept, the first such raised where nothing is found; one raising ``ignore`` is passed
    over. Shared by the layers that try several choices side by side."""
    for attempt in attempts:
        try:
            found = attempt(best)
        except skip as e:
            error = error or e
            continue
        except ignore:
            continue
        if best is None or found.plan.cost.total_s < best.plan.cost.total_s:
            best = found
    if best is None:
        raise error
    return best


def divisors(n: int) -> list:
    """The micro-batch counts a batch of ``n`` splits into evenly, from 1."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _recomputes(plan) -> bool:
    return any(c != "none" for c in plan.recompute.values())


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0]


def batch_size_of(inputs) -> int | None:
    """The batch of flat example inputs as
    :func:`~autopar.passes.split_micro_batches.split_over_batch` reads it: dim 0 of the
    first input that has dims."""
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
    return None
