"""The cost model: seconds of compute and communication and bytes of memory per device.

Compute is a roofline per op, forward and backward, on the slowest device of the mesh (a
synchronous step waits for it): ``max(FLOPs / (peak x MATMUL_EFFICIENCY), bytes / (memory
bandwidth x MEMORY_EFFICIENCY)) + KERNEL_LAUNCH_S``. A device's own figures replace the
defaults where it has them: efficiencies from a cluster file, the launch time measured, and
measured rates against size (a small matmul sustains less of the peak; a copy that fits in
a cache goes faster than memory), read off its curves at the op's FLOPs and bytes.
Communication is alpha-beta per mesh axis, priced on the slowest link the axis's groups
cross: a ring all-reduce of ``b`` bytes on ``n`` ranks takes ``2(n-1)/n b / bandwidth +
2(n-1) latency``, all-gather and reduce-scatter half that, all-to-all ``(n-1)/n b /
bandwidth + (n-1) latency``; each call also costs the link's measured call overhead.
Parameter gradients summed in buckets while backward runs pay what the link does not hide
of them (its ``overlap``, measured or declared; 0 by default). Every forward collective has
its backward mirror from the redistribution table, and gradient sums are all-reduces (or
reduce-scatters, where a gathered parameter's gradient goes back to its shards).

Memory per device is parameters, gradients and optimizer states in their storage layouts,
plus activations saved for backward and values alive at each point of the forward pass.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..program.placement import is_partial, is_shard
from ..program.redistribute import REPLICATED, coded_steps, layout_code
from ..rules.traits import CONTRACTIONS, NO_KERNEL

# Gradients summed over ranks go in buckets of this many bytes, one collective each, as
# DistributedDataParallel's default (bucket_cap_mb=25); the runtime's gradient sync uses it.
BUCKET_BYTES = 25 * 2**20
# Share of datasheet peak FLOP/s a large GEMM sustains. NVIDIA's A100 and H100 tuning guides
# and MLPerf training submissions show dense GEMMs at roughly 60-80% of peak; take 0.7.
MATMUL_EFFICIENCY = 0.7
# Share of datasheet memory bandwidth a streaming kernel reaches (STREAM-like copies on
# HBM2e/HBM3 reach ~80-90%).
MEMORY_EFFICIENCY = 0.8
# Per-op launch and framework overhead on a GPU, forward and backward together: ~5 us each
# way (CUDA launch latency, PyTorch dispatcher). Measured devices bring their own figure.
KERNEL_LAUNCH_S = 10e-6
# Devices measured on this machine (Cluster.local) report what they sustained: no discount.
MEASURED_EFFICIENCY = 1.0

# Backward FLOPs relative to forward: a contraction (rules.traits.CONTRACTIONS) computes two
# GEMMs (grad of each input), elementwise ops about one pass.
BACKWARD_FACTOR_CONTRACTION = 2.0
BACKWARD_FACTOR_OTHER = 1.0

OPTIMIZERS = {"sgd": 0, "adamw": 2, "adam": 2}      # fp32 state tensors per parameter
# Bytes an optimizer step moves per fp32 parameter: SGD reads the weight and gradient and
# writes the weight (12); AdamW also reads and writes both moments (28) in a fused kernel,
# and PyTorch's foreach implementation makes about twice that in passes with temporaries.
OPTIMIZER_TRAFFIC_BYTES = {"sgd": 12.0, "adamw": 56.0, "adam": 56.0}
PRECISIONS = {
    # compute dtype, bytes per activation element (fp32 model), bytes per parameter
    # (weights + gradients): fp32 keeps one copy of each; bf16-mixed keeps fp32 master
    # weights and gradients plus a bf16 working copy.
    "fp32": dict(dtype="fp32", activation_scale=1.0, param_bytes=8.0),
    "bf16-mixed": dict(dtype="bf16", activation_scale=0.5, param_bytes=10.0),
}


@dataclass(frozen=True)
class Training:
    """What a training step holds and computes: precision and optimizer, and how many
    micro-batches the step runs (the program priced is one micro-batch's: its forward and
    backward run that many times, the optimizer step and the bucketed gradient sums of
    parameters once)."""

    precision: str = "fp32"
    optimizer: str = "adamw"
    micro_batches: int = 1

    def __post_init__(self):
        from ..errors import PlanError
        if self.precision not in PRECISIONS:
            raise PlanError(f"precision={self.precision!r}: choose one of {sorted(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise PlanError(f"optimizer={self.optimizer!r}: choose one of {sorted(OPTIMIZERS)}")

    def bytes_per_parameter(self, trainable: bool, element_size: int) -> float:
        """Bytes per parameter element: weights, gradients, optimizer states."""
        if not trainable:
            return float(element_size)
        p = PRECISIONS[self.precision]
        return p["param_bytes"] * element_size / 4 + 4.0 * OPTIMIZERS[self.optimizer]

    def parameter_parts(self, trainable: bool, element_size: int) -> dict:
        """:meth:`bytes_per_parameter` split into weights (with a mixed-precision working
        copy), gradients and optimizer states, as shares of it."""
        total = self.bytes_per_parameter(trainable, element_size)
        if not trainable:
            return {"parameter": 1.0, "gradient": 0.0, "optimizer": 0.0}
        weights_and_grads = PRECISIONS[self.precision]["param_bytes"] * element_size / 4
        grads = element_size   # fp32 gradients (of fp32 master weights, where mixed)
        return {"parameter": (weights_and_grads - grads) / total, "gradient": grads / total,
                "optimizer": 4.0 * OPTIMIZERS[self.optimizer] / total}


def work_floor_s(ops, cluster, training: Training) -> tuple:
    """What ``ops`` ((op, FLOPs, bytes) of one micro-batch's program, whole) cost in any
    plan on ``cluster``, at least: (device-seconds of compute over the step, seconds of
    dispatch per micro-batch on each device).

    The first is each op's forward and backward at the fastest rates any device of the
    cluster reaches, times the micro-batches in ``training``: a split op's shares add up to
    the whole op (:meth:`CostModel.compute_s` divides its work), a replicated one does it on
    every rank, collectives only add; however a plan spreads the step, its devices together
    spend at least this computing. The second is the least launch overhead of a device
    times the ops that run a kernel: every rank runs each op of its program (a pipeline
    stage, each op of its stage) once per micro-batch."""
    dtype = PRECISIONS[training.precision]["dtype"]
    devices = cluster.devices()
    # the fastest any device computes at any size: its curves' best share, where it has them
    peak = max(d.flops_for(dtype) * _matmul_efficiency(d) * _best_share(d.matmul_curve)
               for d in devices)
    bandwidth = max(d.memory_bandwidth_bytes_per_s * _memory_efficiency(d) *
                    _best_share(d.copy_curve) for d in devices)
    overhead = min(getattr(d, "op_overhead_s", None) or KERNEL_LAUNCH_S for d in devices)
    scale = PRECISIONS[training.precision]["activation_scale"]
    total, kernels = 0.0, 0
    for op, flops, num_bytes in ops:
        if op in NO_KERNEL or (flops == 0 and num_bytes == 0):
            continue
        total += roofline_s(op, flops, num_bytes, peak, bandwidth, scale)
        kernels += 1
    return total * training.micro_batches, kernels * overhead


def roofline_s(op: str, flops, num_bytes, peak_flops: float, bandwidth: float,
               activation_scale: float, curves: tuple = (None, None)):
    """Forward plus backward seconds of ``flops`` and ``num_bytes`` (of the fp32 values) of
    one op on a device of those rates, launch aside: the slower of compute and memory. With
    ``curves`` (:func:`size_curve` of the device's matmul and copy curves), the rates are
    those it sustains at the op's size."""
    moved = num_bytes * activation_scale
    matmul, copy = curves
    if matmul is not None and op in CONTRACTIONS:
        peak_flops = peak_flops * _share(matmul, flops)
    if copy is not None:
        bandwidth = bandwidth * _share(copy, moved)
    fwd = np.maximum(flops / peak_flops, moved / bandwidth)
    factor = BACKWARD_FACTOR_CONTRACTION if op in CONTRACTIONS else BACKWARD_FACTOR_OTHER
    return fwd * (1 + factor)


def axis_links(cluster, mesh) -> list:
    """The slowest link each mesh axis's groups cross (inter-node if any group spans nodes,
    else the slowest intra-node link among the nodes it touches)."""
    node_of = []
    for i, node in enumerate(cluster.nodes):
        node_of += [i] * node.count
    links = []
    for a in range(mesh.ndim):
        groups = mesh.groups(a)
        if any(len({node_of[r] for r in g}) > 1 for g in groups):
            links.append(cluster.inter_node)
        else:
            touched = {node_of[r] for g in groups for r in g}
            links.append(min((cluster.nodes[i].intra_node for i in touched),
                             key=lambda l: l.bandwidth_bytes_per_s))
    return links


class CostModel:
    """Prices strategies and redistributions on one mesh of one cluster."""

    def __init__(self, cluster, mesh, training: Training = Training()):
        self.mesh = mesh
        self.training = training
        self.links = axis_links(cluster, mesh)
        dtype = PRECISIONS[training.precision]["dtype"]
        devices = cluster.devices()
        self.peak_flops = min(d.flops_for(dtype) * _matmul_efficiency(d) for d in devices)
        self.memory_bandwidth = min(d.memory_bandwidth_bytes_per_s * _memory_efficiency(d)
                                    for d in devices)
        # the rates against size of the slowest device (its curves, where measured)
        slowest = min(devices, key=lambda d: d.flops_for(dtype) * _matmul_efficiency(d))
        self.curves = (size_curve(slowest.matmul_curve), size_curve(slowest.copy_curve))
        self.memory_bytes = min(d.memory_bytes for d in devices)
        self.op_overhead_s = max(getattr(d, "op_overhead_s", None) or KERNEL_LAUNCH_S
                                 for d in devices)
        self.activation_scale = PRECISIONS[training.precision]["activation_scale"]
        self.micro_batches = training.micro_batches
        self._moves, self._lines = {}, {}

    # -- compute -------------------------------------------------------------------------------

    def work_split(self, in_layouts, out_layout) -> int:
        """Ranks sharing one op's work: every axis on which its output is split, or partial
        because a contracted dim is split (Partial passed through is whole work per rank)."""
        split_in = 0
        for lay in in_layouts:
            split_in |= axes_mask(lay, is_shard)
        axes = work_axes(axes_mask(out_layout, is_shard), axes_mask(out_layout, is_partial),
                         split_in)
        return math.prod(n for a, n in enumerate(self.mesh.shape) if axes >> a & 1)

    def compute_s(self, op: str, flops: float, num_bytes: float, in_layouts, out_layout,
                  split: int | None = None) -> float:
        """Forward plus backward seconds of one op's local share (``split``: its
        :meth:`work_split`, where known)."""
        if (flops == 0 and num_bytes == 0) or op in NO_KERNEL:
            return 0.0
        if split is None:
            split = self.work_split(in_layouts, out_layout)
        work = roofline_s(op, flops / split, num_bytes / split, self.peak_flops,   # (split
                          self.memory_bandwidth, self.activation_scale,      # may be an array)
                          self.curves)
        return (work + self.op_overhead_s) * self.micro_batches

    def optimizer_s(self, num_bytes_local: float, trainable: bool, element_size: int) -> float:
        """The optimizer step over one parameter's local shard: streaming its state."""
        if not trainable:
            return 0.0
        per = OPTIMIZER_TRAFFIC_BYTES[self.training.optimizer]
        return num_bytes_local / element_size * per / self.memory_bandwidth + self.op_overhead_s

    # -- communication -------------------------------------------------------------------------

    def collective_s(self, kind: str, axis: int, num_bytes_full: float,
                     latency_share: float = 1.0) -> float:
        """One collective on ``axis``; ``num_bytes_full`` is the bytes of the whole (gathered
        or reduced) tensor held by the axis's group, local to the other axes. A collective
        sharing a bucket with others pays ``latency_share`` of the latency."""
        n = self.mesh.shape[axis]
        if n == 1 or kind in ("shard", "to_partial", "identity"):
            return 0.0
        link = self.links[axis]
        bw, lat = link.bandwidth_bytes_per_s, link.latency_s * latency_share
        call = link.call_overhead_s * latency_share
        ring = (n - 1) / n
        if kind == "all_reduce":
            return 2 * ring * num_bytes_full / bw + 2 * (n - 1) * lat + call
        if kind in ("all_gather", "reduce_scatter", "all_to_all"):
            return ring * num_bytes_full / bw + (n - 1) * lat + call
        raise ValueError(f"unknown collective {kind}")

    def redistribute_s(self, num_bytes: float, src, dst, grad: bool = True) -> float:
        """Forward plus backward seconds to move a value of ``num_bytes`` (whole) from layout
        ``src`` to ``dst``, following the table: all_gather's backward is a local slice, a
        slice's backward an all_gather, all_reduce's backward the identity, reduce_scatter's
        an all_gather, all_to_all's an all_to_all. Without ``grad`` (no gradient flows into
        the value) only the forward collectives count."""
        if src == dst:
            return 0.0
        key = (src, dst, grad)
        line = self._moves.get(key)
        if line is None:
            line = self._moves[key] = self.redistribute_line(src, dst, grad)
        return line[0] + line[1] * num_bytes

    def redistribute_line(self, src, dst, grad: bool = True) -> tuple:
        """(seconds, seconds per byte of the whole value) of :meth:`redistribute_s`:
        collectives are alpha-beta, so moving a value costs a fixed latency plus a time
        proportional to its bytes."""
        return self.line_of(move_path(tuple(src), tuple(dst)), grad)

    def line_of(self, path: tuple, grad: bool = True) -> tuple:
        """:meth:`redistribute_line` of a :func:`move_path` on this mesh."""
        fixed = per_byte = 0.0
        for kind, forward, backward, axis, split_axes in path:
            times = forward + (backward if grad else 0)
            at0, slope = self._collective_line(kind, axis)
            split = math.prod(self.mesh.shape[a] for a in split_axes)
            fixed += times * at0
            per_byte += times * slope / split * self.activation_scale
        return fixed * self.micro_batches, per_byte * self.micro_batches

    def _collective_line(self, kind: str, axis: int) -> tuple:
        """(seconds at zero bytes, seconds per byte) of one collective on ``axis``."""
        line = self._lines.get((kind, axis))
        if line is None:
            at0 = self.collective_s(kind, axis, 0.0)
            slope = (self.collective_s(kind, axis, _PROBE_BYTES) - at0) / _PROBE_BYTES
            line = self._lines[(kind, axis)] = (at0, slope)
        return line

    def grad_sum_s(self, num_bytes: float, layout, axis: int, fused: bool,
                   bucketed: bool = False) -> float:
        """The backward all-reduce of a replicated input's gradient over ``axis``; ``fused``
        where that input was just gathered over the same axis, so the gradient is
        reduce-scattered back to the shards instead; ``bucketed`` for a parameter's gradient,
        summed with others in buckets of BUCKET_BYTES (its share of one latency)."""
        num_bytes *= self.activation_scale
        full = _local(num_bytes, list(layout), self.mesh, axis)
        once = bucketed and not fused   # after the last micro-batch's backward
        share = min(1.0, full / BUCKET_BYTES) if once else 1.0
        runs = 1 if once else self.micro_batches
        seconds = runs * self.collective_s("reduce_scatter" if fused else "all_reduce", axis,
                                           full, share)
        # bucketed sums run during backward: the share of them the link hides is not paid
        return seconds * (1 - self.links[axis].overlap) if once else seconds


_PROBE_BYTES = float(1 << 30)
# A redistribution step -> (collective, times run forward, times run backward), as in the
# table of the design: all_gather's backward is a local slice, a slice's backward an
# all_gather, all_reduce's backward the identity, reduce_scatter's an all_gather,
# all_to_all's an all_to_all.
_STEP_COLLECTIVES = {"all_gather": ("all_gather", 1, 0), "shard": ("all_gather", 0, 1),
                     "all_reduce": ("all_reduce", 1, 0), "reduce_scatter": ("reduce_scatter", 1, 1),
                     "all_to_all": ("all_to_all", 1, 1)}


def axes_mask(layout, test) -> int:
    """The mesh axes whose placement passes ``test`` (is_shard, is_partial), as bits."""
    return sum(1 << a for a, p in enumerate(layout) if test(p))


def work_axes(out_split, out_partial, in_split):
    """The axes (bit masks, ints or arrays of them) on which ranks share one op's work:
    those its output is split on, and those it holds a partial sum on where an input is
    split (a contracted dim; a Partial passed through is whole work per rank)."""
    return out_split | (out_partial & in_split)


@functools.lru_cache(maxsize=None)
def move_path(src: tuple, dst: tuple) -> tuple:
    """The collectives that move a value from layout ``src`` to ``dst``, whatever the mesh's
    sizes and links: per step (collective, times run forward, times run backward, mesh
    axis, the other axes splitting the value at that step)."""
    return coded_path(layout_code(src), layout_code(dst))


@functools.lru_cache(maxsize=None)
def coded_path(src: tuple, dst: tuple) -> tuple:
    """:func:`move_path` of layouts as :func:`~autopar.program.redistribute.layout_code` writes
    them."""
    cur = list(src)
    path = []
    for step in coded_steps(src, dst):
        kind, forward, backward = _STEP_COLLECTIVES.get(step.kind, (None, 0, 0))
        if forward or backward:
            split = tuple(a for a, p in enumerate(cur) if a != step.axis and p >= 0)
            path.append((kind, forward, backward, step.axis, split))
        cur[step.axis] = dst[step.axis] if step.kind not in ("all_gather", "all_reduce") \
            else REPLICATED
    return tuple(path)


def _local(num_bytes, layout, mesh, except_axis) -> float:
    """Bytes a group along ``except_axis`` handles: the value split by every other axis."""
    split = math.prod(n for a, (p, n) in enumerate(zip(layout, mesh.shape))
                      if a != except_axis and is_shard(p))
    return num_bytes / split


def _efficiency(device, own, default: float) -> float:
    if own is not None:
        return own
    return MEASURED_EFFICIENCY if getattr(device, "measured", False) else default


def _matmul_efficiency(device) -> float:
    """The share of its peak FLOP/s a device sustains on a large matmul: its own figure
    (a cluster file's), else 1 for measured rates, else MATMUL_EFFICIENCY."""
    return _efficiency(device, device.matmul_efficiency, MATMUL_EFFICIENCY)


def _memory_efficiency(device) -> float:
    return _efficiency(device, device.memory_efficiency, MEMORY_EFFICIENCY)


def size_curve(points) -> tuple | None:
    """A device's rate curve (((size, share), ...), sizes ascending) as arrays of log size
    and share, for :func:`_share`; None for none."""
    if not points:
        return None
    sizes, shares = zip(*points)
    return np.log(np.asarray(sizes, dtype=float)), np.asarray(shares, dtype=float)


def _share(curve: tuple, size):
    """The share of the rate sustained at ``size`` (a number or an array): interpolated on
    log size between the curve's points, held at its ends."""
    log_sizes, shares = curve
    return np.interp(np.log(np.maximum(size, 1.0)), log_sizes, shares)


def _best_share(points) -> float:
    """The most of its rate a device reaches at any size (1 without a curve)."""
    return max((share for _, share in points), default=1.0)
