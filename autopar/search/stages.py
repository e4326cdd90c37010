"""Pipeline stages as a layer of the search: how the devices and the program's layers are cut
into stages, each planned on its own sub-mesh by the layers below.

Until stages are planned, the one cut there is: a single stage holding every device and every
layer (p = 1), planned as the whole program. A mesh axis asking for stages (``pp``) is refused
by :class:`~autopar.options.Options`.
"""

from __future__ import annotations

from typing import NamedTuple


class Stage(NamedTuple):
    """A contiguous run of the program's layers on a contiguous run of the cluster's ranks."""

    ranks: range
    layers: str     # which of the program's layers, in words


def search(cluster, plan_stage):
    """The plan of the best cut into stages: ``plan_stage(stage)`` plans one stage with the
    layers below (recomputation, meshes, the per-op program). One stage: every rank, every
    layer."""
    return plan_stage(Stage(range(cluster.world_size), "all"))
