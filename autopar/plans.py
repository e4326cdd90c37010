"""The plan: the mesh, every parameter's and node's layout, the predicted cost, statistics.

Identical on every rank (its fingerprint is compared at start-up), serializable to JSON,
printable as a table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from .placement import format_layout, parse_layout


@dataclass(frozen=True)
class Cost:
    """Predicted time of one training step (forward and backward) and peak memory."""

    total_s: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    memory_bytes_per_device: float = 0.0


@dataclass
class Plan:
    mesh: dict                      # axis name -> size, in order
    placements: dict                # parameter/buffer FQN -> layout (tuple of placements)
    inputs: dict                    # input name -> layout
    nodes: dict                     # node name -> {"op", "inputs": [layout], "output": layout}
    cost: Cost = field(default_factory=Cost)
    stats: dict = field(default_factory=dict)
    cluster: str = ""

    @property
    def world_size(self) -> int:
        n = 1
        for v in self.mesh.values():
            n *= v
        return n

    def to_dict(self) -> dict:
        return {
            "mesh": dict(self.mesh),
            "cluster": self.cluster,
            "placements": {k: format_layout(v) for k, v in self.placements.items()},
            "inputs": {k: format_layout(v) for k, v in self.inputs.items()},
            "nodes": {k: {"op": v["op"], "inputs": [format_layout(x) for x in v["inputs"]],
                          "output": format_layout(v["output"])} for k, v in self.nodes.items()},
            "cost": asdict(self.cost),
            "stats": self.stats,
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
            nodes={k: {"op": v["op"], "inputs": [parse_layout(x) for x in v["inputs"]],
                       "output": parse_layout(v["output"])} for k, v in d["nodes"].items()},
            cost=Cost(**d.get("cost", {})), stats=d.get("stats", {}), cluster=d.get("cluster", ""))

    def fingerprint(self) -> str:
        """A hash of everything that shapes the rank programs (not timings)."""
        d = self.to_dict()
        d.pop("stats")
        d.pop("cost")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def explain(self, per: str = "param") -> str:
        """A table of the plan: parameters and their layouts (``per="param"``) or every op
        (``per="op"``), with the predicted cost."""
        from io import StringIO

        from rich.console import Console
        from rich.table import Table

        table = Table()
        if per == "op":
            for col in ("node", "op", "inputs", "output"):
                table.add_column(col)
            for name, v in self.nodes.items():
                table.add_row(name, v["op"], " ".join(format_layout(x) for x in v["inputs"]),
                              format_layout(v["output"]))
        else:
            table.add_column("parameter")
            table.add_column("layout")
            for name, layout in self.placements.items():
                table.add_row(name, format_layout(layout))
            for name, layout in self.inputs.items():
                table.add_row(f"(input) {name}", format_layout(layout))
        c = self.cost
        buf = StringIO()
        console = Console(file=buf, width=120, force_terminal=False)
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        console.print(f"autopar plan: mesh {mesh} on {self.cluster}")
        console.print(table)
        console.print(f"predicted step {_seconds(c.total_s)} (compute {_seconds(c.compute_s)}, "
                      f"communication {_seconds(c.comm_s)}); peak memory per device "
                      f"{format_bytes(c.memory_bytes_per_device)}")
        return buf.getvalue()

    def __str__(self) -> str:
        return self.explain()


def format_bytes(n: float) -> str:
    """``10000`` -> ``'9.8 KiB'``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _seconds(t: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"
