"""What the user asks of a plan, as one frozen value checked once.

``autopar.compile``, ``autopar.plan`` and the torch.compile backend build an :class:`Options`
from their keyword arguments; the passes and every layer of the search read it (as
torchtitan's ``ParallelDims`` carries the parallel degrees). A bad value is a
:class:`~autopar.errors.PlanError` naming it and a remedy, raised before anything is traced.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .cost.model import Training
from .errors import PlanError

LEVELS = ("fast", "full")
RECOMPUTE_CHOICES = ("none", "selective", "full")
# The mesh axis of pipeline stages, outermost (torchtitan's "pp"), and other names for it.
PIPELINE_AXIS = "pp"
PIPELINE_AXES = ("pp", "pipeline", "stage", "stages")
# Pipeline schedules: GPipe (every forward, then every backward), 1F1B (one forward, one
# backward in the steady state), interleaved 1F1B (v chunks of layers per rank, v >= 2:
# "interleaved-1f1b" is v = 2, "interleaved-1f1b-v4" v = 4).
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


@dataclass(frozen=True)
class Options:
    """The user's requests; every field but ``verbose`` shapes the plan.

    mesh: axis name -> size, outer to inner; None tries every factorization of the devices.
    constraints: glob over parameter FQNs and input names -> the layout each is *used* in
        (and a parameter stored in, unless ``storage`` says otherwise).
    storage: glob over parameter FQNs -> the layout each is *held* in.
    level: "full" solves the integer program, "fast" propagates greedily.
    memory_budget_bytes: per-device memory the plan must fit; None: the device's.
    precision, optimizer: what a training step holds and computes.
    fold: plan each repeated block once.
    recompute: a choice for every block, or globs over block paths -> choices.
    micro_batches: how many micro-batches the global batch runs as; None: the planner's.
    schedule: the pipeline schedule (one of SCHEDULES); None: the planner's.
    stages: layers per pipeline stage, in order (an uneven split, e.g. (3, 5)); None: the
        planner's. With a "pp" mesh axis of p, p stages (p * v for interleaved 1F1B).
    verbose: show the solver's log.
    """

    mesh: Mapping | None = None
    constraints: Mapping = field(default_factory=dict)
    storage: Mapping = field(default_factory=dict)
    level: str = "full"
    memory_budget_bytes: float | None = None
    precision: str = "fp32"
    optimizer: str = "adamw"
    fold: bool = True
    recompute: object = None
    micro_batches: int | None = None
    schedule: str | None = None
    stages: tuple | None = None
    verbose: bool = False

    def __post_init__(self):
        for name in ("constraints", "storage"):
            value = getattr(self, name)
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise PlanError(f"{name}={value!r}: give a dict of globs over parameter names "
                                "to layouts, e.g. {'*.fc1.weight': 'RS(0)'}")
            object.__setattr__(self, name, MappingProxyType(dict(value)))
        if self.mesh is not None:
            object.__setattr__(self, "mesh", MappingProxyType(_checked_mesh(self.mesh)))
        if self.level not in LEVELS:
            raise PlanError(f"level={self.level!r}: choose 'fast' (propagation) or 'full' "
                            "(exact)")
        Training(self.precision, self.optimizer)   # checks both
        budget = self.memory_budget_bytes
        if budget is not None and (isinstance(budget, bool) or
                                   not isinstance(budget, (int, float)) or budget <= 0):
            raise PlanError(f"memory_budget_bytes={budget!r}: give a positive number of bytes "
                            "per device, or None for the device's memory")
        m = self.micro_batches
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise PlanError(f"micro_batches={m!r}: give a whole number >= 1 (how many "
                            "micro-batches the global batch runs as), or None to let the "
                            "planner choose")
        _check_recompute(self.recompute)
        if self.schedule is not None:
            schedule_chunks(self.schedule)   # checks it
        if self.stages is not None:
            st = self.stages
            if isinstance(st, (str, bytes)) or not hasattr(st, "__iter__") or not list(st) or \
                    any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in st):
                raise PlanError(f"stages={st!r}: give the number of layers of each pipeline "
                                "stage, in order, e.g. (3, 5)")
            object.__setattr__(self, "stages", tuple(st))
        if not isinstance(self.fold, bool):
            raise PlanError(f"fold={self.fold!r}: pass True or False")

    def pins_of(self, name: str) -> tuple:
        """(the layout ``name`` is pinned to be used in, the one it is pinned to be stored
        in), each None where no glob names it; the last glob matching it wins."""
        return tuple(next((layout for glob, layout in reversed(list(pins.items()))
                           if fnmatch.fnmatchcase(name, glob)), None)
                     for pins in (self.constraints, self.storage))

    def pinned(self, name: str) -> str:
        """What the user pinned of ``name``: "use", "storage", "use, storage" or ""."""
        return ", ".join(kind for kind, layout in zip(("use", "storage"), self.pins_of(name))
                         if layout is not None)

    @property
    def pipeline_stages(self) -> int | None:
        """The stage count the mesh pins (its "pp" axis), None where it pins none."""
        if self.mesh is None:
            return None
        return self.mesh.get(PIPELINE_AXIS, 1)

    @property
    def stage_mesh(self) -> dict | None:
        """The mesh pinned for each stage: the mesh without its "pp" axis."""
        if self.mesh is None:
            return None
        return {a: n for a, n in self.mesh.items() if a != PIPELINE_AXIS} or None

    def training(self, micro_batches: int | None = None) -> Training:
        """The cost model's view of a step: precision, optimizer, micro-batch count."""
        return Training(self.precision, self.optimizer,
                        micro_batches or self.micro_batches or 1)

    def replace(self, **changes) -> "Options":
        """A copy with ``changes``, checked as a new value is."""
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict:
        """The keyword arguments that build this value again."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("mesh", "constraints", "storage"):
            if out[name] is not None:
                out[name] = dict(out[name])
        return out


def _checked_mesh(mesh) -> dict:
    if not isinstance(mesh, Mapping) or not mesh:
        raise PlanError(f"mesh={mesh!r}: give axis names and sizes, outer to inner, e.g. "
                        "{'dp': 2, 'tp': 4}")
    for axis, size in mesh.items():
        if not isinstance(axis, str) or isinstance(size, bool) or not isinstance(size, int) \
                or size < 1:
            raise PlanError(f"mesh={dict(mesh)!r}: axis {axis!r} of size {size!r}; give each "
                            "axis a name and a whole size >= 1")
    staged = [a for a in mesh if a.lower() in PIPELINE_AXES]
    if any(a != PIPELINE_AXIS for a in staged):
        raise PlanError(f"mesh axis {staged[0]!r} in {dict(mesh)} asks for pipeline stages: "
                        f"name that axis {PIPELINE_AXIS!r}")
    if staged and next(iter(mesh)) != PIPELINE_AXIS:
        order = {PIPELINE_AXIS: mesh[PIPELINE_AXIS],
                 **{a: s for a, s in mesh.items() if a != PIPELINE_AXIS}}
        raise PlanError(f"mesh={dict(mesh)}: the pipeline axis {PIPELINE_AXIS!r} is the "
                        f"outermost, as torchtitan's meshes have it: {order}")
    return dict(mesh)


def schedule_chunks(schedule: str) -> tuple:
    """(schedule name, chunks of layers per rank) of a schedule string; a PlanError naming
    the choices for anything else."""
    import re
    m = re.fullmatch(r"(gpipe|1f1b|interleaved-1f1b)(?:-v(\d+))?", str(schedule).lower())
    if m is None or (m.group(2) and m.group(1) != "interleaved-1f1b"):
        raise PlanError(f"schedule={schedule!r}: choose one of {', '.join(SCHEDULES)} "
                        "(interleaved-1f1b-v<k> for k chunks of layers per rank)")
    if m.group(1) != "interleaved-1f1b":
        return m.group(1), 1
    v = int(m.group(2) or 2)
    if v < 2:
        raise PlanError(f"schedule={schedule!r}: interleaved 1F1B runs at least 2 chunks of "
                        "layers per rank; use 1f1b for one")
    return m.group(1), v


def _check_recompute(request):
    if request is None:
        return
    if isinstance(request, str):
        request = {"*": request}
    if not isinstance(request, Mapping):
        raise PlanError(f"recompute={request!r}: give a choice ({', '.join(RECOMPUTE_CHOICES)}) "
                        "or a dict of block globs to choices, e.g. {'layers.*': 'full'}")
    for pattern, choice in request.items():
        if choice not in RECOMPUTE_CHOICES:
            raise PlanError(f"recompute[{pattern!r}] = {choice!r}: choose one of "
                            f"{', '.join(RECOMPUTE_CHOICES)}")
