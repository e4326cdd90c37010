"""The rank program: the graph every rank runs, how to shard its attributes, and its source
with each value's layout in a comment."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.fx as fx

from ..program.placement import format_layout


@dataclass
class RankProgram:
    """The per-rank program: one graph for all ranks, and how to shard each attribute."""

    graph: fx.Graph
    attrs: dict            # local attribute name -> (FQN, layout)
    mesh: object
    input_shapes: list     # global shape and dtype per placeholder
    layouts: dict          # node name -> layout, for comments in the code
    grad_sync: dict = field(default_factory=dict)  # attribute name -> axis names to sum
    recomputed: list = field(default_factory=list)  # runtime.checkpoint.Recomputed, in order
    notes: dict = field(default_factory=dict)       # node name -> comment, besides layouts



def annotate_code(code: str, layouts: dict, notes: dict | None = None) -> str:
    """Append each value's layout (or note) as a comment on the line that defines it."""
    out, notes = [], notes or {}
    for line in code.splitlines():
        m = re.match(r"\s+(\w+) = ", line)
        if m and m.group(1) in layouts:
            line = f"{line}  # {format_layout(layouts[m.group(1)])}"
        elif m and m.group(1) in notes:
            line = f"{line}  # {notes[m.group(1)]}"
        out.append(line)
    return "\n".join(out)


def program_code(program: RankProgram, code: str) -> str:
    """A rank program's source (``code``, its GraphModule's) with layouts in comments,
    followed by the source of every block it recomputes."""
    parts = [annotate_code(code.strip("\n"), program.layouts, program.notes)]
    for block in program.recomputed:
        body = block.graph_module.code.strip("\n").rstrip().replace(
            "def forward(self", f"def {block.__name__}(self", 1)
        parts.append(f"# {block.path or block.__name__}, recomputed in backward ({block.choice}): "
                     f"autopar_runtime_checkpoint_{block.__name__} runs it under "
                     "torch.utils.checkpoint\n" + annotate_code(body, program.layouts))
    return "\n\n".join(parts)
