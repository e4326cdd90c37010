"""autopar: automatic parallelization of PyTorch programs.

    import autopar
    cluster = autopar.Cluster.preset("dgx-a100", nodes=2)
    pm = autopar.compile(model, cluster, example_inputs=(x,))
"""

from .api import Examination, compile, examine, plan
from .backend import backend, register as _register_backend
from .cluster import Cluster, DeviceSpec, LinkSpec
from .errors import AutoparError, CaptureError, InputError, NoFit, PlanError
from .placement import Partial, Replicate, Shard, format_layout, parse_layout
from .plans import Cost, Plan
from .runtime.module import ParallelModule

__version__ = "0.1.0"

_register_backend()  # torch.compile(model, backend="autopar")

__all__ = ["compile", "plan", "examine", "backend", "Examination", "Cluster", "DeviceSpec",
           "LinkSpec", "Plan", "Cost", "ParallelModule", "Shard", "Replicate", "Partial",
           "format_layout", "parse_layout", "AutoparError", "PlanError", "NoFit", "InputError",
           "CaptureError"]
