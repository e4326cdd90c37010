"""The search for a plan: a nest of layers, each a small search over the layers below it.

Read top-down, outermost first::

    choose(plan_at, batch_size, options)            micro-batch counts        microbatch.py
      plan_at(m): the program of one micro-batch, captured once per plan() call and split
      per count (passes/split_micro_batches.py), then planned by
    plan_program(program, cluster, options)         one micro-batch's program
      stages.search                                  pipeline stages (p = 1)   stages.py
        recompute.choose_recompute                   none/selective/full per   recompute.py
                                                     block, where memory binds
          meshes.choose_plan                         every candidate mesh      meshes.py
            problem.build_problem, solver.solve      the per-op program on     problem.py,
            (or meshes.propagate at level "fast")    one mesh, priced and      pricing.py,
                                                     solved exactly            solver.py

Each layer keeps the fastest plan within the memory budget of what it tried and hands it up
as a :class:`~autopar.search.result.Planned`; :mod:`autopar.search.result` holds what a
plan is (:class:`~autopar.search.result.Plan`, :class:`~autopar.search.result.Cost`).
"""

from __future__ import annotations

from . import meshes, microbatch, recompute, stages
from .pricing import Facts
from .result import Planned


def choose(plan_at, batch_size: int | None, options, staged=None, cluster=None,
           layers=None):
    """The plan of the micro-batch count that steps fastest within memory: ``plan_at(m)``
    plans the program of one of m micro-batches (whatever it returns, with the ``.plan``
    it made); the count the options pin, else :func:`microbatch.choose_micro_batches`.

    With ``staged`` (where the options pin no mesh), pipelines are tried beside:
    ``staged(p, bound, flat)`` plans the step with p stages (as a mesh of ``{"pp": p}``
    pins; those predicted slower than ``bound`` are not planned; ``flat``: the plan of one
    stage, None where none fits), for the
    stage counts :func:`stages.stage_counts` finds worth trying on ``cluster`` (no more
    than ``layers(found)``, the layers of the program a plan of one stage planned, where
    given); the fastest plan within memory is kept."""
    if staged is None:
        return _choose_flat(plan_at, batch_size, options)
    from ..errors import NoFit, PlanError
    try:
        best, error = _choose_flat(plan_at, batch_size, options), None
    except NoFit as e:
        best, error = None, e
    return microbatch.fastest(
        [lambda found, p=p: staged(p, found.plan.cost.total_s if found is not None else None,
                                   best)
         for p in stages.stage_counts(cluster, best.plan if best is not None else None,
                                      layers(best) if layers and best is not None else None)],
        best, error, skip=(NoFit,),
        ignore=(PlanError,))   # a program without layers to cut, or fewer than stages


def _choose_flat(plan_at, batch_size, options):
    if options.micro_batches is not None:
        return plan_at(options.micro_batches)
    if (options.pipeline_stages or 1) > 1:
        return microbatch.choose_pipeline_micro_batches(plan_at, batch_size,
                                                        options.pipeline_stages)
    return microbatch.choose_micro_batches(plan_at, batch_size)


def plan_program(gm, cluster, options, stats: dict, input_names=(), blocks=()) -> Planned:
    """The fastest plan of one program (one micro-batch's, the count in ``options``) within
    the memory budget: its stages, the recompute choice of each block, the mesh and every
    node's strategy. ``blocks``: the classes of repeated blocks folding found."""
    training = options.training()
    budget = options.memory_budget_bytes
    if budget is None:
        budget = min(d.memory_bytes for d in cluster.devices())
    stats["memory_budget_bytes"] = budget
    pins = recompute.resolve_recompute(options.recompute, recompute.block_paths(blocks))
    facts = Facts()   # what the programs built on this one share, over every layer below

    def plan_stage(stage):
        def plan_with(choices, mesh=None, refine_bound=True) -> Planned:
            return meshes.choose_plan(gm, cluster, options, training, budget, stats,
                                      input_names, blocks if options.fold else [],
                                      recompute=choices, facts=facts,
                                      refine_bound=refine_bound, mesh=mesh)
        return recompute.choose_recompute(plan_with, blocks, pins, budget)

    return stages.search(cluster, plan_stage)


def reprice(gm, mesh, cluster, training, blocks=(), choices=None):
    """The :class:`~autopar.search.result.Cost` of the strategies ``gm``'s nodes hold (their
    ``"autopar.strategy"``), priced node by node on the whole program on ``mesh``: every
    instance of a repeated block on its own, none standing for another, with the recompute
    ``choices`` (block path -> choice, over ``blocks``) applied per instance. A plan's
    reported price is the price of the program that runs: this prices that program as a
    search of it unfolded would, to check that folding priced it the same."""
    from ..cost.model import CostModel
    from .problem import build_problem
    facts = Facts()
    prob = build_problem(gm, mesh, CostModel(cluster, mesh, training), None, (), "ends", facts)
    if choices:
        prob = recompute.Recompute(choices, blocks).apply(prob, facts)
    return prob.evaluate({n: prob.options[n].index(n.meta["autopar.strategy"])
                          for n in prob.nodes})
