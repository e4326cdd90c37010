"""Op rules: which placements each op admits, as data, with its FLOPs and bytes.

A rule is a function ``rule(node) -> OpSpec`` registered under one or more canonical op names
by :func:`register`. It describes the op for a single mesh axis: every admissible
``(input placements, output placement)`` pair. :func:`strategies` combines these per axis into
layouts for a whole mesh and keeps those whose shards split evenly. The solver never looks at
``node.target``: it sees only the canonical name (``node.meta["autopar.op"]``) and the spec.

Rules are grouped by op family in this package; adding an op touches one file.
"""

from __future__ import annotations

# importing each op family registers its rules
from . import factory, fused, index, matrix, pointwise, pool, reduction, shape  # noqa: E402,F401
from .core import (OpSpec, P, R, Strategy, arg, broadcast_labels, candidates, einsum_flops,
                   einsum_options, even_combos, io_bytes, is_tensor_like, known_ops,
                   make_strategies, norm_dim, num_bytes_of, out_vals, register, replicated_options,
                   rule_for, shape_of, spec_for, strategies, tensor_inputs)

__all__ = ["OpSpec", "P", "R", "Strategy", "arg", "broadcast_labels", "candidates", "einsum_flops",
           "einsum_options", "even_combos", "io_bytes", "is_tensor_like", "known_ops",
           "make_strategies", "norm_dim", "num_bytes_of", "out_vals", "register",
           "replicated_options", "rule_for", "shape_of", "spec_for", "strategies", "tensor_inputs"]
