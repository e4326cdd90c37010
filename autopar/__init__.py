"""autopar: automatic parallelization of PyTorch programs.

    import autopar
    cluster = autopar.Cluster.preset("dgx-a100", nodes=2)
    pm = autopar.compile(model, cluster, example_inputs=(x,))

Importing autopar costs little more than importing torch: the names below that need DTensor,
Dynamo or the solver load their modules at first use.
"""

import importlib
import sys

from .backend import backend
from .backend import register as _register_backend
from .cost.cluster import Cluster, DeviceSpec, LinkSpec
from .errors import (AutoparError, CaptureError, InputError, NoFit, PlanError, PlanMismatch,
                     RankFailed)

__version__ = "0.1.0"

# torch.compile(model, backend="autopar"): Dynamo finds the backend by the entry point that
# installing autopar declares; registering here is for a Dynamo already imported without it.
if "torch._dynamo" in sys.modules:
    _register_backend()

# name -> its module, imported when the name is first read (PEP 562)
_LAZY = {"compile": "api", "plan": "api", "examine": "api", "Examination": "api",
         "Plan": "search.result", "Cost": "search.result", "ParallelModule": "runtime.module",
         "Shard": "program.placement", "StridedShard": "program.placement",
         "Replicate": "program.placement",
         "Partial": "program.placement",
         "format_layout": "program.placement", "parse_layout": "program.placement",
         "apply": "runtime.dtensor"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    else:  # a submodule, as ``autopar.passes`` was found once autopar imported it eagerly
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["compile", "plan", "examine", "backend", "Examination", "Cluster", "DeviceSpec",
           "LinkSpec", "Plan", "Cost", "ParallelModule", "Shard", "StridedShard", "Replicate",
           "Partial",
           "format_layout", "parse_layout", "AutoparError", "PlanError", "NoFit", "InputError",
           "CaptureError", "RankFailed", "PlanMismatch", "apply"]
