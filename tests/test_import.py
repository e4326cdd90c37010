"""``import autopar`` stays cheap: at most 0.5 s more than ``import torch`` (0.3 s is the aim),
none of DTensor, Dynamo, the solver or rich loaded by it, and ``torch.compile(model,
backend="autopar")`` still found, by the entry point installing autopar declares. Each check
runs in a fresh Python process, where nothing is imported yet."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

MAX_OVERHEAD_S = 0.5

HEAVY = ("torch._dynamo", "torch.distributed.tensor", "scipy", "highspy", "rich", "networkx",
         "sympy", "transformers")


def run_python(code: str, cwd=None) -> str:
    """Run ``code`` in a fresh interpreter; its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.processes   # it times itself
def test_import_costs_at_most_half_a_second_more_than_torch():
    timed = """
        import time
        import torch
        start = time.perf_counter()
        import autopar
        print(time.perf_counter() - start)
    """
    overhead_s = min(float(run_python(timed)) for _ in range(3))
    print(f"import autopar after import torch: {overhead_s:.3f} s (best of 3)")
    assert overhead_s <= MAX_OVERHEAD_S


def test_import_leaves_dtensor_dynamo_solver_and_rich_unloaded():
    listed = f"""
        import sys
        import torch
        before = set(sys.modules)
        import autopar
        print(" ".join(m for m in {HEAVY!r} if m in sys.modules and m not in before))
    """
    assert run_python(listed).split() == []


def test_public_names_load_at_first_use():
    used = """
        import torch
        from torch.distributed.tensor import Partial, Replicate, Shard
        import autopar
        assert (autopar.Shard, autopar.Replicate, autopar.Partial) == (Shard, Replicate, Partial)
        from autopar import *  # every name of __all__ resolves
        assert callable(autopar.compile) and callable(autopar.plan)
        assert autopar.passes.run_passes and autopar.ParallelModule.__name__ == "ParallelModule"
        assert issubclass(autopar.NoFit, autopar.PlanError)
        try:
            autopar.no_such_name
        except AttributeError:
            print("ok")
    """
    assert run_python(used).strip() == "ok"


def test_torch_compile_finds_the_backend_by_name_without_importing_autopar(tmp_path):
    # from an empty directory, so only the installed package's metadata is read
    compiled = """
        import sys
        import torch
        assert "autopar" in torch._dynamo.list_backends(exclude_tags=())
        x = torch.randn(4, 3)
        y = torch.compile(lambda x: torch.relu(x) * 2, backend="autopar")(x)
        torch.testing.assert_close(y, torch.relu(x) * 2)
        import autopar
        assert "autopar.api" in sys.modules  # autopar planned the graph
        # loading autopar.backend for Dynamo left autopar.backend the function, not the module
        assert autopar.backend.__name__ == "backend" and callable(autopar.backend)
        print("ok")
    """
    assert run_python(compiled, cwd=tmp_path).strip() == "ok", \
        "reinstall autopar (pip install -e .) to declare its torch_dynamo_backends entry point"


def test_without_the_entry_point_importing_autopar_registers_it_with_dynamo_loaded():
    registered = """
        import importlib.metadata
        entry_points = importlib.metadata.entry_points
        def without_autopar(**selection):  # as if autopar were not installed
            found = entry_points(**selection)
            return importlib.metadata.EntryPoints(e for e in found if e.name != "autopar")
        importlib.metadata.entry_points = without_autopar
        import torch
        import torch._dynamo
        import autopar
        from autopar.backend import _registered
        assert torch._dynamo.lookup_backend("autopar") is _registered
        print("ok")
    """
    assert run_python(registered).strip() == "ok"
