"""autopar: automatic parallelization of PyTorch programs.

    import autopar
    cluster = autopar.Cluster.preset("dgx-a100", nodes=2)
    pm = autopar.compile(model, cluster, example_inputs=(x,))
"""

from .api import Examination, compile, examine, plan
from .cluster import Cluster, DeviceSpec, LinkSpec
from .errors import AutoparError, CaptureError, InputError, PlanError
from .placement import Partial, Replicate, Shard, format_layout, parse_layout
from .plans import Cost, Plan
from .runtime.module import ParallelModule

__version__ = "0.1.0"

__all__ = ["compile", "plan", "examine", "Examination", "Cluster", "DeviceSpec", "LinkSpec",
           "Plan", "Cost", "ParallelModule", "Shard", "Replicate", "Partial", "format_layout",
           "parse_layout", "AutoparError", "PlanError", "InputError", "CaptureError"]
