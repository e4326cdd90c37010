"""The plan: the mesh, every parameter's and node's layout, the predicted cost, statistics.

Identical on every rank (its fingerprint is compared at start-up), serializable to JSON,
printable as a table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from ..program.graph import block_of
from ..program.placement import Partial, Shard, format_layout, is_shard, parse_layout
from ..rules.traits import WEIGHT_CONTRACTIONS
from ..units import format_bytes, format_seconds


class Use(NamedTuple):
    """How one op computes with a parameter: the op, the layout it reads the parameter in
    (through any views or casts), the op's output layout, and the parameter's rank."""

    op: str
    layout: tuple
    output: tuple
    ndim: int

    def role(self, axis: int, stored) -> str:
        """What this use does with the parameter on mesh axis ``axis``, in words."""
        p = self.layout[axis]
        if not is_shard(p):
            if is_shard(stored):
                return "stored split, gathered for use"
            return "replicated"
        if self.ndim == 3 and p.dim == 0:
            return "expert split"
        if self.op == "embedding":
            return "vocabulary split" if p.dim == 0 else "embedding dim split"
        if self.op in WEIGHT_CONTRACTIONS:
            return "row-parallel" if isinstance(self.output[axis], Partial) else \
                "column-parallel"
        return f"split on dim {p.dim}"


@dataclass(frozen=True)
class Cost:
    """Predicted time of one training step (forward and backward) and peak memory per
    device, the larger of two points: each op of the forward pass at its most (parameters,
    their gradients and optimizer states in their storage layouts, activations saved for
    backward and other live values, and the transient of recomputing a block in backward,
    of the gradients held between micro-batches, of the gradients in flight as backward
    passes that op (a loss's copies), or of what the caller holds: its batch and the loss),
    and late backward (the parameters' storage, what the caller holds, and the buckets of
    the gradients summed over ranks, ``bucket_bytes``, or the first block recomputed while
    they wait)."""

    total_s: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    memory_bytes_per_device: float = 0.0
    parameter_bytes: float = 0.0
    gradient_bytes: float = 0.0
    optimizer_bytes: float = 0.0
    activation_bytes: float = 0.0
    transient_bytes: float = 0.0
    bucket_bytes: float = 0.0
    # what the forward pass leaves alive when backward starts, beyond the parameters'
    # storage: activations saved for it, values still to be read, the loss held for the
    # caller (of the first micro-batch; measure_step's ``saved``)
    saved_bytes: float = 0.0


# The steps that may leave a plan short of the best assignment of its program, as
# ``plan.stats["optimality"]["restricted"]`` names them.
SUPPORT = "branched only on the strategies the relaxation used"
HINTED = "branched only on the strategies the tied plan's relaxation used"
TIME_LIMITED = "stopped at the solver's time limit"
PRUNED = "strategies pruned to those scoring best near a greedy plan"
GREEDY = "greedy, in graph order (level 'fast')"
FOLDED = {"tied": "every instance of a repeated block planned alike",
          "ends": "the middle instances of a repeated block planned alike",
          "mixed": "the middle instances of a repeated block planned alike, in two runs"}
# a plan within this share of its bound is proven optimal (HiGHS's own gap is 1e-4)
PROVEN_GAP = 1e-4


@dataclass(frozen=True)
class Optimality:
    """How far a plan may be from the best assignment of the program it was planned in:
    ``bound_s``, seconds no assignment of it steps below (the solver's bound: the
    relaxation's optimum, or branch and bound's dual bound; None where nothing was
    proved), and ``restricted``, the steps that may have kept the search from the best
    (empty where the solver proved it)."""

    bound_s: float | None = None
    restricted: tuple = ()

    def folded(self, folding, blocks) -> "Optimality":
        """With the restriction folding ``blocks`` as ``folding`` says puts on the plan."""
        kind = folding[0] if isinstance(folding, tuple) else folding
        tied = 2 if kind == "tied" else 3
        if not any(len(c.instances) >= tied for c in blocks):
            return self
        return Optimality(self.bound_s, (FOLDED[kind], *self.restricted))

    def report(self, total_s: float) -> dict:
        """What ``plan.stats["optimality"]`` says of a plan stepping in ``total_s``: the
        bound, the gap (the share of the plan's step it may be above the best), whether
        that is proven within PROVEN_GAP, and the steps restricting the search."""
        gap = None if self.bound_s is None else max(0.0, (total_s - self.bound_s) / total_s)
        folding = [r for r in self.restricted if r in FOLDED.values()]
        return {"plan_s": total_s, "bound_s": self.bound_s, "gap": gap,
                "proven": gap is not None and gap <= PROVEN_GAP,
                "restricted": list(self.restricted),
                "scope": "the plan's mesh, recompute choices and micro-batch count" +
                         (f"; {folding[0]}, as the bound is" if folding else "")}


def optimality_line(o: dict) -> str:
    """``plan.stats["optimality"]`` in words."""
    if o["proven"]:
        head = "optimal for its program (the solver's bound proves it)"
    elif o["gap"] is not None:
        head = (f"within {o['gap']:.2%} of the best of its program (the solver's bound, "
                f"{format_seconds(o['bound_s'])})")
    else:
        head = "not bounded: how far from the best of its program it may be is unknown"
    rest = [r for r in o["restricted"] if r not in FOLDED.values()]
    folded = [r for r in o["restricted"] if r in FOLDED.values()]
    return (f"optimality: {head}" + (f"; search: {'; '.join(rest)}" if rest and not
                                     o["proven"] else "") +
            (f"; the program: {folded[0]}" if folded else ""))


class Planned(NamedTuple):
    """What a layer of the search hands up: the mesh, the per-op problem on it, the chosen
    strategy index of each of its nodes, the cost, the recompute choice of each block
    (empty below the recomputation layer), and how far the per-op plan may be from the
    best of its program (:class:`Optimality`)."""

    mesh: object
    problem: object
    choice: dict
    cost: Cost
    recompute: dict = {}
    optimality: Optimality = Optimality()


@dataclass
class Plan:
    mesh: dict                      # axis name -> size, in order
    placements: dict                # parameter/buffer FQN -> layout (tuple of placements)
    inputs: dict                    # input name -> layout
    nodes: dict                     # node name -> {"op", "inputs": [layout], "output": layout,
                                    #   "module", "compute_s", "comm_s", "memory_bytes"}
    cost: Cost = field(default_factory=Cost)
    stats: dict = field(default_factory=dict)
    cluster: str = ""
    recompute: dict = field(default_factory=dict)   # block path -> "none"/"selective"/"full"
    micro_batches: int = 1          # the global batch runs as this many, gradients summed
    uses: dict = field(default_factory=dict)   # parameter FQN -> [Use]: how ops read it
    pinned: dict = field(default_factory=dict)  # parameter or input name -> what the user
                                                #   pinned: "use", "storage", "use, storage"
    stages: list = field(default_factory=list)  # pipeline stages, in order: per stage a dict
                                                #   of its ranks, device, layers, mesh,
                                                #   time_s, memory_bytes, its own cost,
                                                #   forward_s, backward_s, fixed_s,
                                                #   transfer_s (empty: one stage)
    schedule: str = ""                          # the pipeline schedule ("" for one stage)

    @property
    def world_size(self) -> int:
        n = 1
        for v in self.mesh.values():
            n *= v
        return n

    @property
    def op_mesh(self) -> dict:
        """The mesh each op's layouts are over: the mesh without its pipeline axis."""
        return {a: n for a, n in self.mesh.items() if a != "pp"}

    def to_dict(self) -> dict:
        return {
            "mesh": dict(self.mesh),
            "cluster": self.cluster,
            "placements": {k: format_layout(v) for k, v in self.placements.items()},
            "inputs": {k: format_layout(v) for k, v in self.inputs.items()},
            "nodes": {k: {**v, "inputs": [format_layout(x) for x in v["inputs"]],
                          "output": format_layout(v["output"])} for k, v in self.nodes.items()},
            "cost": asdict(self.cost),
            "stats": self.stats,
            "recompute": dict(self.recompute),
            "micro_batches": self.micro_batches,
            "uses": {k: [{"op": u.op, "layout": format_layout(u.layout),
                          "output": format_layout(u.output), "ndim": u.ndim} for u in v]
                     for k, v in self.uses.items()},
            "pinned": dict(self.pinned),
            "stages": [dict(st) for st in self.stages],
            "schedule": self.schedule,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        return cls(
            mesh=dict(d["mesh"]),
            placements={k: parse_layout(v) for k, v in d["placements"].items()},
            inputs={k: parse_layout(v) for k, v in d["inputs"].items()},
            nodes={k: {**v, "inputs": [parse_layout(x) for x in v["inputs"]],
                       "output": parse_layout(v["output"])} for k, v in d["nodes"].items()},
            cost=Cost(**d.get("cost", {})), stats=d.get("stats", {}), cluster=d.get("cluster", ""),
            recompute=dict(d.get("recompute", {})), micro_batches=int(d.get("micro_batches", 1)),
            uses={k: [Use(u["op"], parse_layout(u["layout"]), parse_layout(u["output"]),
                          u["ndim"]) for u in v] for k, v in d.get("uses", {}).items()},
            pinned=dict(d.get("pinned", {})), stages=list(d.get("stages", [])),
            schedule=d.get("schedule", ""))

    def fingerprint(self) -> str:
        """A hash of everything that shapes the rank programs (not timings)."""
        d = self.to_dict()
        d.pop("stats")
        d.pop("cost")
        d["nodes"] = {k: {"op": v["op"], "inputs": v["inputs"], "output": v["output"]}
                      for k, v in d["nodes"].items()}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def explain(self, per: str = "param") -> str:
        """The plan as a table, with the predicted cost.

        ``per="param"``: every parameter's and input's layout; ``per="op"``: every op's
        layouts, compute, communication and memory; ``per="block"``: the same summed per
        block of the module hierarchy (``h.0``, ``layers.3``).
        """
        from io import StringIO

        from rich.console import Console
        from rich.table import Table

        if per not in ("param", "op", "block"):
            raise ValueError(f"per={per!r}: choose 'param', 'op' or 'block'")
        table = Table()
        if per == "param":
            for col in ("parameter", "stored", "used as", "parallelism", "pinned"):
                table.add_column(col)
            for name, layout in self.placements.items():
                used = " ".join(dict.fromkeys(format_layout(u.layout)
                                              for u in self.uses.get(name, ())))
                table.add_row(name, format_layout(layout), used or "-", self.role(name),
                              self.pinned.get(name, ""))
            for name, layout in self.inputs.items():
                table.add_row(f"(input) {name}", format_layout(layout), "-",
                              self._input_role(layout), self.pinned.get(name, ""))
        else:
            first = ["node", "op", "inputs", "output"] if per == "op" else ["block", "ops",
                                                                            "outputs",
                                                                            "recompute"]
            for col in first:
                table.add_column(col)
            for col in ("compute", "communication", "saved memory"):
                table.add_column(col, justify="right")
            for row in (self._op_rows() if per == "op" else self._block_rows()):
                table.add_row(*row[:-3], format_seconds(row[-3]), format_seconds(row[-2]),
                              format_bytes(row[-1]))
        c = self.cost
        buf = StringIO()
        console = Console(file=buf, width=140, force_terminal=False)
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        console.print(f"autopar plan: mesh {mesh} on {self.cluster}")
        if per == "param":
            for line in self.axis_summary():
                console.print(line)
            if self.pinned:
                console.print("pinned: what the user fixed (use: constraints=, storage: "
                              "storage=); the cost model chose every other layout")
        console.print(table)
        budget = self.stats.get("memory_budget_bytes")
        console.print(f"predicted step {format_seconds(c.total_s)} (compute {format_seconds(c.compute_s)}, "
                      f"communication {format_seconds(c.comm_s)}); peak memory per device "
                      f"{format_bytes(c.memory_bytes_per_device)}" +
                      (f" of {format_bytes(budget)}" if budget and not self.stages else ""))
        console.print(self._memory_line())
        if self.stages:
            console.print(self._stage_table())
        if self.micro_batches > 1:
            console.print(f"micro-batches: {self.micro_batches} per step, gradients summed "
                          "before one optimizer step")
        if self.recompute:
            console.print("recompute: " + "; ".join(
                f"{_span(paths)} {choice}" for choice, paths in _runs_of(self.recompute)))
        if "optimality" in self.stats:
            console.print(optimality_line(self.stats["optimality"]))
        return buf.getvalue()

    def role(self, fqn: str) -> str:
        """What parallelism parameter ``fqn`` takes part in, per mesh axis, in words:
        ``"dp: replicated; tp: column-parallel"``."""
        stored, uses = self.placements[fqn], self.uses.get(fqn, ())
        parts = []
        for i, axis in enumerate(self.op_mesh):
            roles = list(dict.fromkeys(u.role(i, stored[i]) for u in uses))
            if not roles:
                roles = ["stored split" if is_shard(stored[i]) else "replicated"]
            parts.append(f"{axis}: {' / '.join(roles)}")
        return "; ".join(parts)

    def _input_role(self, layout) -> str:
        parts = [f"{axis}: " + ("batch split" if p == Shard(0) else f"split on dim {p.dim}"
                                if is_shard(p) else "replicated")
                 for axis, p in zip(self.op_mesh, layout)]
        return "; ".join(parts)

    def axis_summary(self) -> list:
        """One line per mesh axis saying what runs on it: data parallel (the batch split),
        tensor parallel (parameters used split, by kind), sharded parameter storage, other
        splits of the work, or nothing split at all."""
        lines = []
        if self.stages:
            lines.append(f"  pp ({len(self.stages)}): pipeline stages, each its layers on "
                         f"its own devices ({self.schedule})")
        for i, axis in enumerate(self.op_mesh):
            kinds, gathered, replicated = {}, 0, 0
            for fqn, stored in self.placements.items():
                roles = {u.role(i, stored[i]) for u in self.uses.get(fqn, ())}
                for r in roles - {"replicated", "stored split, gathered for use"}:
                    kinds[r] = kinds.get(r, 0) + 1
                gathered += "stored split, gathered for use" in roles
                replicated += roles == {"replicated"}
            dims = {}
            for v in self.nodes.values():
                p = v["output"][i]
                key = "partial sums" if isinstance(p, Partial) else \
                    p.dim if is_shard(p) else None
                if key is not None:
                    dims[key] = dims.get(key, 0) + 1
            what = []
            if dims.get(0):
                what.append(f"data parallel: {dims[0]} of {len(self.nodes)} ops work on a "
                            f"split of the batch (dim 0), {replicated} parameters and buffers "
                            f"replicated (gradients summed over {axis})")
            if kinds:
                what.append("tensor parallel: " + ", ".join(
                    f"{n} {kind}" for kind, n in sorted(kinds.items())) + " parameters")
            if gathered:
                what.append(f"sharded parameters (FSDP/ZeRO-3): {gathered} stored split, "
                            "gathered for use")
            other = {d: n for d, n in dims.items() if d not in (0, "partial sums")}
            if other:
                what.append("ops split on " + ", ".join(
                    f"dim {d} ({n})" for d, n in sorted(other.items())))
            if not what and not dims:
                what.append("nothing split: every device on this axis repeats the same work")
            lines.append(f"  {axis} ({self.op_mesh[axis]}): " + "; ".join(what or
                         [f"{dims['partial sums']} ops leave partial sums"]))
        return ["what runs on each mesh axis:"] + lines

    def _stage_table(self):
        from rich.table import Table
        bubble = self.stats.get("pipeline", {}).get("bubble")
        title = f"pipeline: {len(self.stages)} stages, schedule {self.schedule}, " \
                f"{self.micro_batches} micro-batches"
        if bubble is not None:
            title += f", bubble {bubble:.0%} of the step"
        table = Table(title=title)
        for col in ("stage", "devices", "ranks", "layers", "mesh", "stage step",
                    "memory of budget", "micro-batches held"):
            table.add_column(col)
        for st in self.stages:
            mesh = " x ".join(f"{k}={v}" for k, v in st["mesh"].items())
            table.add_row(str(st["stage"]), st["device"], f"{st['ranks'][0]}..{st['ranks'][1]}",
                          _span(st["layers"]), mesh,
                          format_seconds(st["time_s"]),
                          f"{format_bytes(st['memory_bytes'])} of "
                          f"{format_bytes(st.get('budget_bytes') or 0)}",
                          str(st["micro_batches_held"]))
        return table

    def _memory_line(self) -> str:
        c = self.cost
        parts = (("parameters", c.parameter_bytes), ("gradients", c.gradient_bytes),
                 ("optimizer", c.optimizer_bytes), ("activations", c.activation_bytes),
                 ("transient", c.transient_bytes))
        line = "memory per device at the forward pass's peak: " + ", ".join(
            f"{name} {format_bytes(v)}" for name, v in parts if v or name != "transient")
        if c.bucket_bytes:
            line += (f"; late in backward, gradient-sum buckets "
                     f"{format_bytes(c.bucket_bytes)}")
        return line

    def _op_rows(self):
        for name, v in self.nodes.items():
            yield (name, v["op"], " ".join(format_layout(x) for x in v["inputs"]),
                   format_layout(v["output"]), v.get("compute_s", 0.0), v.get("comm_s", 0.0),
                   v.get("memory_bytes", 0.0))

    def _block_rows(self):
        blocks = {}
        for v in self.nodes.values():
            b = blocks.setdefault(block_of(v.get("module", "")), [0, set(), 0.0, 0.0, 0.0])
            b[0] += 1
            b[1].add(format_layout(v["output"]))
            b[2] += v.get("compute_s", 0.0)
            b[3] += v.get("comm_s", 0.0)
            b[4] += v.get("memory_bytes", 0.0)
        for name, (ops, outs, comp, comm, mem) in blocks.items():
            yield (name or "(top level)", str(ops), " ".join(sorted(outs)),
                   self.recompute.get(name, "-"), comp, comm, mem)

    def optimality_text(self) -> str:
        """How far the plan may be from the best of its program, in words ("" where the
        search did not say)."""
        o = self.stats.get("optimality")
        return optimality_line(o) if o else ""

    def report(self, path):
        """Write the plan as one self-contained HTML page to ``path`` (the mesh, what runs
        on each axis, memory and time per device and per layer, the pipeline schedule:
        :mod:`autopar.search.report`); returns its ``pathlib.Path``."""
        from .report import write_report
        return write_report(self, path)

    def __str__(self) -> str:
        return self.explain()


def _runs_of(recompute: dict) -> list:
    """(choice, block paths) for each run of consecutive blocks taking one choice."""
    out = []
    for path, choice in recompute.items():
        if out and out[-1][0] == choice:
            out[-1][1].append(path)
        else:
            out.append((choice, [path]))
    return out


def _span(paths: list) -> str:
    """``['h.0', 'h.1', 'h.2']`` -> ``'h.0-h.2'``."""
    return paths[0] if len(paths) == 1 else f"{paths[0]}-{paths[-1]} ({len(paths)} blocks)"
