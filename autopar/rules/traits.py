"""Per-op traits the cost model, the memory model, recomputation and the plan's words read:
which ops contract, launch no kernel, save what for backward, only relabel a layout. Keyed
by canonical op name (``node.meta["autopar.op"]``), as the rules are."""

from __future__ import annotations

# Backward FLOPs relative to forward: a contraction computes two GEMMs (grad of each input),
# elementwise ops about one pass.
CONTRACTIONS = frozenset({"linear", "matmul", "bmm", "mm", "addmm", "baddbmm", "addbmm",
                          "einsum", "scaled_dot_product_attention",
                          "multi_head_attention_forward"})
# Ops that contract a parameter with their input: a parameter split there is column- or
# row-parallel.
WEIGHT_CONTRACTIONS = CONTRACTIONS - {"scaled_dot_product_attention",
                                       "multi_head_attention_forward"} | {
    "grouped_mm_fallback", "conv1d", "conv2d", "conv3d"}

# Ops that launch no kernel: they return a view of their input's storage.
NO_KERNEL = frozenset({
    "view", "transpose", "permute", "t", "getitem", "split", "chunk", "unbind", "unsqueeze",
    "squeeze", "flatten", "expand", "expand_as", "view_as", "detach", "alias", "movedim",
    "adjoint", "broadcast_to", "tensor_split", "split_with_sizes"})
# Ops that only relabel their input's layout (views, casts): a parameter pinned to the layout
# it is used in passes through them to the op that computes with it, with no collective.
CARRY_LAYOUT = NO_KERNEL | {"reshape", "contiguous", "clone", "to", "type", "float", "half",
                            "bfloat16", "double"}

# Ops whose backward needs none of their inputs (linear maps and data movement).
SAVES_NOTHING = frozenset({
    "add", "sub", "neg", "pos", "rsub", "view", "reshape", "flatten", "unsqueeze", "squeeze",
    "view_as", "ravel", "transpose", "permute", "t", "movedim", "adjoint", "expand",
    "expand_as", "broadcast_to", "contiguous", "clone", "detach", "alias", "to", "type",
    "float", "half", "bfloat16", "double", "getitem", "split", "chunk", "unbind",
    "tensor_split", "split_with_sizes", "cat", "stack", "repeat_interleave", "sum", "mean",
    "zeros_like", "ones_like", "empty_like", "full_like", "arange", "zeros", "ones", "full",
    "new_zeros", "new_ones", "new_full", "new_empty", "eq", "ne", "lt", "le", "gt", "ge",
    "dropout",
})
# Ops whose backward reads their output (and whatever else they save of their inputs).
# Attention keeps its output too, but its fused kernels lay it out as (batch, sequence,
# heads, dim), so that the usual transpose back to (batch, sequence, width) is a view of it,
# which the output projection saves: it is counted there.
SAVES_OUTPUT = frozenset({"softmax", "log_softmax", "tanh", "sigmoid", "exp"})
# Ops whose backward holds this many copies of their first input's gradient at once, while
# all that the forward pass saved is still alive: cross-entropy's gradient of the
# log-probabilities beside that of the logits. Where a loss ends the program (the usual
# case), this is where the step peaks.
GRADIENT_COPIES = {"cross_entropy": 2}
# Ops that keep only some of their inputs, and which: op -> slots (an embedding's gradient
# scatters by the indices).
KEEPS_ONLY = {"embedding": {0}}
# Ops whose output is a view of their first input's storage.
VIEWS = frozenset({"view", "view_as", "transpose", "permute", "t", "unsqueeze", "squeeze",
                   "expand", "expand_as", "broadcast_to", "movedim", "adjoint", "split",
                   "chunk", "unbind", "tensor_split", "split_with_sizes", "detach", "alias"})
# ... where their input is contiguous (else they copy).
VIEWS_OF_CONTIGUOUS = frozenset({"reshape", "flatten", "ravel", "contiguous"})

# Under "selective" recomputation, the outputs of these ops stay saved (and are not computed
# again); every other op of the block is recomputed.
KEPT_BY_SELECTIVE = CONTRACTIONS
