"""The hardware a cluster is made of: device types and link classes, with their datasheet
figures, and the known machines (presets) built from them.

Device figures are vendor datasheet numbers, dense (no structured sparsity); link bandwidths are
per device, one direction; between nodes a device gets its share of its node's network. Each
figure names its source beside it. Latencies are not on datasheets: they are order-of-magnitude
estimates, marked as such, that only matter for small messages. Calibrated figures (measured,
or given in a cluster file) sit beside them on the same specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..errors import PlanError, closest

GB = 1e9
TFLOPS = 1e12
Gbps = 1e9 / 8  # network line rate in bytes per second

# What a dtype name falls back to when a device has no figure of its own for it: V100 and T4
# have no bf16 units (their fp16 tensor figure is the nearest), nothing but Ampere and later
# has tf32, and fp32 is always there.
DTYPE_FALLBACK = {"fp32": ("fp32",), "tf32": ("tf32", "fp32"), "fp16": ("fp16", "bf16", "fp32"),
             "bf16": ("bf16", "fp16", "fp32")}
_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
            "bfloat16": "bf16"}


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator type: peak FLOP/s per dtype, memory, memory bandwidth."""

    name: str
    peak_flops: Mapping[str, float]
    memory_bytes: float
    memory_bandwidth_bytes_per_s: float
    # True when the figures were measured (Cluster.local): rates this device sustained, which
    # the cost model takes as they are rather than discounting them like datasheet peaks.
    measured: bool = False
    # Framework and launch time per op (forward and backward) where it was measured; the
    # cost model's KERNEL_LAUNCH_S otherwise.
    op_overhead_s: float | None = None
    # Shares of the peaks a device sustains, where known (a cluster file's, or measured):
    # None takes the cost model's MATMUL_EFFICIENCY and MEMORY_EFFICIENCY for datasheet
    # peaks, 1 for measured ones.
    matmul_efficiency: float | None = None
    memory_efficiency: float | None = None
    # Rates against size, measured: ((FLOPs of one matmul, share of the peak it sustains),
    # ...) and ((bytes a copy moves, share of the memory bandwidth), ...), sizes ascending;
    # between and beyond them the share is interpolated on log size (held at the ends).
    # Empty: the same share at every size.
    matmul_curve: tuple = ()
    copy_curve: tuple = ()

    def __post_init__(self):
        if not self.peak_flops.get("fp32", 0) > 0:
            raise PlanError(f"device type {self.name!r} needs a positive fp32 peak; "
                            f"got peak_flops={dict(self.peak_flops)!r}")

    def flops_for(self, dtype) -> float:
        """Peak FLOP/s for ``dtype`` ("fp32", "tf32", "fp16", "bf16" or a torch.dtype),
        falling back bf16 -> fp16 -> fp32 (and fp16 -> bf16, tf32 -> fp32) where the device
        has no figure for it.

        >>> DEVICES["V100-16GB"].flops_for("bf16") == DEVICES["V100-16GB"].flops_for("fp16")
        True
        """
        name = _dtype_name(dtype)
        return next(self.peak_flops[d] for d in DTYPE_FALLBACK[name] if d in self.peak_flops)


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in DTYPE_FALLBACK:
        raise PlanError(f"no peak FLOP/s figure for dtype {dtype!r}; use one of "
                        f"{sorted(DTYPE_FALLBACK)} (closest: {closest(name, DTYPE_FALLBACK)})")
    return name


@dataclass(frozen=True)
class LinkSpec:
    """A link class: per-device bandwidth in one direction, latency per message, and the
    fixed time a program spends on each collective call over it beyond its messages
    (issuing it, waiting for it, the ranks meeting at it), where measured."""

    bandwidth_bytes_per_s: float
    latency_s: float
    call_overhead_s: float = 0.0
    # A point-to-point transfer over it (a pipeline's hand-off between stages), where
    # measured; None takes the bandwidth and latency above.
    p2p_bandwidth_bytes_per_s: float | None = None
    p2p_latency_s: float | None = None
    # The share of a collective the runtime overlaps with computing (bucketed gradient sums
    # during backward) that the backend really hides, where measured or declared; 0 prices
    # them as if they ran alone.
    overlap: float = 0.0


def _tf(fp32, tf32=None, fp16=None, bf16=None) -> dict:
    figures = dict(fp32=fp32, tf32=tf32, fp16=fp16, bf16=bf16)
    return {k: v * TFLOPS for k, v in figures.items() if v is not None}


DEVICES = {d.name: d for d in [
    # NVIDIA A100 Tensor Core GPU datasheet (2021, SXM column): FP32 19.5 TF, TF32 156 TF,
    # BF16 312 TF, FP16 312 TF (dense; the starred figures are 2x with sparsity);
    # A100 40GB HBM2 at 1,555 GB/s, A100 80GB HBM2e at 2,039 GB/s.
    DeviceSpec("A100-40GB", _tf(19.5, 156, 312, 312), 40 * GB, 1555 * GB),
    DeviceSpec("A100-80GB", _tf(19.5, 156, 312, 312), 80 * GB, 2039 * GB),
    # NVIDIA H100 Tensor Core GPU datasheet (2023, H100 SXM column): FP32 67 TF; TF32 989 TF,
    # BF16 and FP16 1,979 TF are with sparsity, so 494.5 and 989.5 dense; 80GB at 3.35 TB/s.
    DeviceSpec("H100-80GB", _tf(67, 494.5, 989.5, 989.5), 80 * GB, 3350 * GB),
    # NVIDIA Tesla V100 datasheet (2020, V100 SXM2 column, as in AWS p3): single precision
    # 15.7 TF, tensor (FP16 in, FP32 accumulate) 125 TF; 16 or 32 GB HBM2 at 900 GB/s.
    DeviceSpec("V100-16GB", _tf(15.7, fp16=125), 16 * GB, 900 * GB),
    DeviceSpec("V100-32GB", _tf(15.7, fp16=125), 32 * GB, 900 * GB),
    # NVIDIA T4 datasheet (2019): single precision 8.1 TF, mixed precision (FP16/FP32) 65 TF;
    # 16 GB GDDR6 at "320+ GB/s".
    DeviceSpec("T4", _tf(8.1, fp16=65), 16 * GB, 320 * GB),
    # A10G (AWS g5) has no NVIDIA datasheet; figures as AWS gives them, tabulated in Baseten,
    # "NVIDIA A10 vs A10G for ML model inference" (2023): FP32 35 TF, TF32 35 TF, BF16 and
    # FP16 70 TF (dense); 24 GB GDDR6 at 600 GB/s. (The A10 proper: 31.2 / 62.5 / 125.)
    DeviceSpec("A10G", _tf(35, 35, 70, 70), 24 * GB, 600 * GB),
    # NVIDIA L4 datasheet (2023): FP32 30.3 TF; TF32 120 TF, BF16 and FP16 242 TF are with
    # sparsity, so 60 and 121 dense; 24 GB GDDR6 at 300 GB/s.
    DeviceSpec("L4", _tf(30.3, 60, 121, 121), 24 * GB, 300 * GB),
    # A nominal set of CPU cores, used by Cluster.local(measure=False); measure=True replaces it
    # with this machine's measured figures (autopar/cost/probe.py).
    DeviceSpec("cpu", _tf(0.1), 16 * GB, 20 * GB),
]}

# Latency estimates (not datasheet figures): NVLink/NVSwitch hop ~2 us, PCIe peer copy ~5 us,
# InfiniBand ~5 us, AWS EFA (SRD) ~15 us, TCP over the instance's ENA network ~30 us.
# V100 in a 4-GPU quad of the 8-GPU hybrid cube-mesh (NVIDIA DGX-1 with V100 whitepaper, 2017):
# 4 of its 6 NVLink2 links (25 GB/s each way) reach the other three GPUs of the quad.
NVLINK2_QUAD = LinkSpec(100 * GB, 2e-6)
NVLINK2 = LinkSpec(150 * GB, 2e-6)       # V100 datasheet: NVLink 300 GB/s, both directions
NVLINK3 = LinkSpec(300 * GB, 2e-6)       # A100 datasheet: NVLink 600 GB/s, both directions
NVLINK4 = LinkSpec(450 * GB, 2e-6)       # H100 SXM datasheet: NVLink 900 GB/s, both directions
PCIE3 = LinkSpec(15.75 * GB, 5e-6)       # PCIe 3.0 x16: 8 GT/s x 16 lanes x 128/130, one way
PCIE4 = LinkSpec(31.5 * GB, 5e-6)        # PCIe 4.0 x16: 16 GT/s x 16 lanes x 128/130, one way


@dataclass(frozen=True)
class NodePreset:
    """A known machine: ``count`` devices, the link within it and each device's share of the
    network between machines."""

    device: str
    count: int
    intra_node: LinkSpec
    inter_node: LinkSpec


PRESETS = {
    # NVIDIA DGX A100 user guide: 8 x A100 (80GB in the DGX A100 640GB) on NVSwitch; eight
    # single-port ConnectX-6 200 Gb/s HDR InfiniBand for compute, one per GPU.
    "dgx-a100": NodePreset("A100-80GB", 8, NVLINK3, LinkSpec(200 * Gbps, 5e-6)),
    # NVIDIA DGX H100 user guide: 8 x H100 SXM on NVSwitch; eight ConnectX-7 400 Gb/s NDR
    # InfiniBand ports for compute, one per GPU.
    "dgx-h100": NodePreset("H100-80GB", 8, NVLINK4, LinkSpec(400 * Gbps, 5e-6)),
    # AWS EC2 P3 instance page: p3.8xlarge 4 x V100-16GB with NVLink, "up to 10 Gbps"
    # network; p3.16xlarge 8 x V100-16GB, 25 Gbps; p3dn.24xlarge 8 x V100-32GB, 100 Gbps EFA.
    "p3.8xlarge": NodePreset("V100-16GB", 4, NVLINK2_QUAD, LinkSpec(10 * Gbps / 4, 30e-6)),
    "p3.16xlarge": NodePreset("V100-16GB", 8, NVLINK2, LinkSpec(25 * Gbps / 8, 30e-6)),
    "p3dn.24xlarge": NodePreset("V100-32GB", 8, NVLINK2, LinkSpec(100 * Gbps / 8, 15e-6)),
    # AWS EC2 P4 instance page: p4d.24xlarge 8 x A100-40GB, p4de.24xlarge 8 x A100-80GB, both
    # NVSwitch (600 GB/s) and 400 Gbps EFA with GPUDirect RDMA.
    "p4d.24xlarge": NodePreset("A100-40GB", 8, NVLINK3, LinkSpec(400 * Gbps / 8, 15e-6)),
    "p4de.24xlarge": NodePreset("A100-80GB", 8, NVLINK3, LinkSpec(400 * Gbps / 8, 15e-6)),
    # AWS EC2 P5 instance page: p5.48xlarge 8 x H100-80GB, NVSwitch (900 GB/s), 3,200 Gbps EFAv2.
    "p5.48xlarge": NodePreset("H100-80GB", 8, NVLINK4, LinkSpec(3200 * Gbps / 8, 15e-6)),
    # AWS EC2 G4 instance page: g4dn.12xlarge 4 x T4 (PCIe 3.0 x16, T4 datasheet), 50 Gbps.
    "g4dn.12xlarge": NodePreset("T4", 4, PCIE3, LinkSpec(50 * Gbps / 4, 15e-6)),
    # AWS EC2 G5 instance page: g5.48xlarge 8 x A10G (PCIe 4.0), 100 Gbps.
    "g5.48xlarge": NodePreset("A10G", 8, PCIE4, LinkSpec(100 * Gbps / 8, 15e-6)),
    # AWS EC2 G6 instance page: g6.48xlarge 8 x L4 (PCIe 4.0 x16, L4 datasheet), 100 Gbps.
    "g6.48xlarge": NodePreset("L4", 8, PCIE4, LinkSpec(100 * Gbps / 8, 15e-6)),
}

# Gloo over loopback, nominal: Cluster.local() measures the real figures (cost/probe.py).
LOCAL_LINK = LinkSpec(2 * GB, 50e-6)

# Links a cluster file may leave out: DGX A100's (NVSwitch within, HDR InfiniBand between).
DEFAULT_INTRA_NODE = NVLINK3
DEFAULT_INTER_NODE = LinkSpec(25 * GB, 5e-6)
