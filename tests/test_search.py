"""The search nest: one plan() call captures the model once, whatever micro-batch counts and
recompute choices it tries, and its stats account for the whole call."""

from __future__ import annotations

import time
import warnings

import torch

import autopar
from autopar.program import capture as capture_module
from test_recompute_planning import DP, WIDE, meta_llama


def test_one_plan_call_captures_once_over_micro_batch_counts_and_recompute(monkeypatch):
    calls = []
    real = capture_module.capture

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("autopar.api.capture", counted)
    model, example = meta_llama(**WIDE)
    free = autopar.plan(model, autopar.Cluster.preset("dgx-a100", nodes=1),
                        example_inputs=example, mesh=DP)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        p = autopar.plan(model, autopar.Cluster.preset("dgx-a100", nodes=1),
                         example_inputs=example, mesh=DP,
                         memory_budget_bytes=0.4 * free.cost.memory_bytes_per_device)
        wall = time.perf_counter() - start
    assert p.micro_batches > 1 and len(p.stats["micro_batch_counts_tried"]) > 1
    assert len(calls) == 1 and p.stats["captures"] == 1
    seconds = p.stats["seconds"]
    parts = sum(v for k, v in seconds.items() if k != "total")
    assert seconds["total"] <= wall
    # the gaps between phases are the search's own bookkeeping: a few percent of the call,
    # more where the machine is busy (the suite's gloo worlds tearing down beside it)
    assert abs(parts - seconds["total"]) <= 0.08 * seconds["total"], seconds


def test_the_rank_program_is_generated_once_for_the_count_kept(monkeypatch):
    from autopar.passes import generate_rank_program as real
    made = []

    def counted(gm, ctx):
        made.append(ctx.options.micro_batches)
        return real(gm, ctx)

    monkeypatch.setattr(autopar.passes, "generate_rank_program", counted)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    pm = autopar.compile(net, autopar.Cluster.local(2, measure=False),
                         example_inputs=(torch.randn(4, 8),), simulate=True)
    assert made == [pm.plan.micro_batches]
