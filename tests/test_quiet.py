"""Planning writes nothing to stdout or stderr: not HiGHS's banner or log (printed from C, so
captured at the file descriptors), not a progress bar on a non-terminal, not a warning. With
the "autopar" logger at DEBUG the solver's log goes to that logger instead."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import torch
import torch.nn as nn

import autopar
from autopar.search.meshes import _LazyProgress
from autopar.search.highs import solver_log_enabled


class Net(nn.Module):
    def __init__(self, d=64, h=256):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).pow(2).mean()


def plan_small_model():
    """A plan by the exact planner (level="full" runs HiGHS), on the meta device."""
    with torch.device("meta"):
        model = Net()
    return autopar.plan(model, autopar.Cluster.preset("dgx-a100"), level="full",
                        example_inputs=(torch.empty(4096, 64, device="meta"),))


def test_planning_writes_nothing(capfd):
    plan_small_model()
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_planning_in_a_fresh_process_writes_nothing():
    # HiGHS prints its banner once per process, so only a fresh one shows that it is kept off
    code = textwrap.dedent("""
        import test_quiet
        test_quiet.plan_small_model()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


def test_solver_log_goes_to_the_autopar_logger_at_debug(caplog, capfd):
    assert not solver_log_enabled()
    caplog.set_level(logging.DEBUG, logger="autopar")
    assert solver_log_enabled()
    plan_small_model()
    solver = [r.getMessage() for r in caplog.records if r.name == "autopar.search.solver"]
    assert any(m.startswith("HiGHS:") and "rows" in m for m in solver), solver[:5]
    assert capfd.readouterr() == ("", "")  # through the logger only, not the console


def test_progress_bar_stays_off_a_non_terminal(capfd, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # which rich alone would take for a terminal
    progress = _LazyProgress(total=3, after_s=0.0)
    for label in ("a", "b", "c"):
        progress.advance(label)
    progress.close()
    assert progress.bar is None
    assert capfd.readouterr() == ("", "")
