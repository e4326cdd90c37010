"""check_coverage: find the ops that have no sharding rule and say where they came from."""

from __future__ import annotations

import warnings

from autopar.program.graph import where
from autopar.rules import rule_for
from autopar.rules.names import describe_target


def check_coverage(gm, ctx):
    """List every call node without a rule in ``ctx.unsupported`` as (op, target, module path,
    file:line); such ops run replicated, with one warning per op naming it.

    Reads ``node.meta["autopar.op"]``.
    """
    seen = {}
    ctx.unsupported = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        op = node.meta["autopar.op"]
        if rule_for(op) is not None:
            continue
        path, loc = where(node)
        entry = (op, describe_target(node), path, loc)
        ctx.unsupported.append(entry)
        seen.setdefault(op, entry)
    for op, (_, target, path, loc) in seen.items():
        warnings.warn(f"autopar: no sharding rule for {op} ({target}) at {path} {loc}; "
                      "it runs replicated (all inputs gathered)", stacklevel=2)
    return gm
