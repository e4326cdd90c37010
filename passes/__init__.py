"""autopar's compiler passes and the one runner that runs them.

A pass is a plain function ``(gm, ctx) -> gm``. Per-node facts live in ``node.meta`` under
namespaced keys (``"autopar.op"``, ``"autopar.strategy"``, ...) besides fx's own ``"val"``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from autopar.errors import AutoparError
from autopar.options import Options
from autopar.program.graph import paused_gc


class PassError(RuntimeError):
    """A pass failed on a program it should have handled."""


@dataclass
class PassContext:
    """What passes share: the target, the user's options, and what earlier passes found."""

    cluster: object = None
    mesh: object = None                 # autopar.program.mesh.Mesh, chosen by assign_layouts
    options: Options = field(default_factory=Options)   # what the user asked for
    example_inputs: list = field(default_factory=list)   # flat, one per placeholder
    input_names: list = field(default_factory=list)
    param_fqns: list = field(default_factory=list)
    repeats: list = field(default_factory=list)   # autopar.program.repeats.Repeat, from capture
    unsupported: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    plan: object = None
    program: object = None


def run_passes(gm, ctx: PassContext, passes) -> object:
    """Run ``passes`` in order, adding each one's seconds into ``ctx.stats["seconds"]``."""
    with paused_gc():
        return _run_passes(gm, ctx, passes)


def _run_passes(gm, ctx, passes):
    done = []
    seconds = ctx.stats.setdefault("seconds", {})
    for p in passes:
        start = time.perf_counter()
        try:
            gm = p(gm, ctx)
        except AutoparError:
            raise
        except Exception as e:
            raise PassError(f"pass {p.__name__} failed after {done}: "
                            f"{type(e).__name__}: {e}") from e
        finally:  # a pass that raises took its time too (a micro-batch count that fits not)
            seconds[p.__name__] = seconds.get(p.__name__, 0.0) + time.perf_counter() - start
        done.append(p.__name__)
    return gm


from .annotate_shapes import annotate_shapes  # noqa: E402
from .assign_layouts import assign_layouts  # noqa: E402
from .check_coverage import check_coverage  # noqa: E402
from .expand_repeats import expand_repeats  # noqa: E402
from .fold_repeated_blocks import fold_repeated_blocks  # noqa: E402
from .generate_rank_program import generate_rank_program  # noqa: E402
from .mark_segments import mark_segments  # noqa: E402
from .normalize_graph import normalize_graph  # noqa: E402
from .plan_stages import plan_stages  # noqa: E402
from .simplify_graph import simplify_graph  # noqa: E402
from .split_micro_batches import split_micro_batches  # noqa: E402

# Run once per plan() call on the captured program ...
PREPARE = [normalize_graph, annotate_shapes, simplify_graph]
# ... then on a copy per micro-batch count: the split right after simplify_graph (sizes are
# constants from then on), the blocks folded at the micro-batch's shapes.
PER_COUNT = [split_micro_batches, expand_repeats, mark_segments, check_coverage,
             fold_repeated_blocks]
ANALYSIS = PREPARE + PER_COUNT
PIPELINE = ANALYSIS + [assign_layouts, generate_rank_program]

__all__ = ["PassContext", "PassError", "run_passes", "ANALYSIS", "PIPELINE", "normalize_graph",
           "annotate_shapes", "simplify_graph", "expand_repeats", "mark_segments", "check_coverage",
           "assign_layouts",
           "generate_rank_program", "plan_stages"]
