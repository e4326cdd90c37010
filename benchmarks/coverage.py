"""Which ops of real models have no sharding rule, and what share of the FLOPs they hold.

Runs ``autopar.examine`` on the transformers families of tests/test_hf.py and the vision
families of examples/vision_models.py (tiny configs, random weights, nothing downloaded) and
prints one row per model: how it was captured, its op count, the ops without a rule (they
run replicated) and their share of the forward FLOPs.

    python benchmarks/coverage.py               # about two minutes on 2 cores
"""

from __future__ import annotations

import os
import sys
import warnings

from rich.console import Console
from rich.table import Table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "examples"), os.path.join(ROOT, "tests")]

from vision_models import define_missing_torchvision_ops  # noqa: E402

define_missing_torchvision_ops()   # before transformers, which imports torchvision

import autopar  # noqa: E402


def models():
    """(name, model, example inputs) of every family."""
    import test_hf
    import vision_models
    for name, make in test_hf.FAMILIES.items():
        model, inputs = make()
        yield f"transformers {name}", model, inputs
    for name, make in vision_models.FAMILIES.items():
        model, images = make()
        yield f"vision {name}", model, (images,)


def main():
    table = Table(title="ops without a sharding rule (they run replicated)")
    for col in ("model", "capture", "ops", "without a rule", "share of FLOPs"):
        table.add_column(col)
    for name, model, inputs in models():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = autopar.examine(model, inputs)
        missing = sorted({u[0] for u in found.unsupported})
        table.add_row(name, found.capture_method, str(sum(found.op_counts.values())),
                      ", ".join(missing) or "none", f"{found.replicated_flops_share:.2%}")
    Console(width=140).print(table)
    return table


if __name__ == "__main__":
    main()
