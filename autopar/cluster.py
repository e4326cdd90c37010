"""The cluster model: device types, nodes of devices, and the links between them.

Figures are vendor datasheet numbers (dense, no sparsity); sources are named beside each.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Mapping

from .errors import PlanError, closest

GB = 1e9
GiB = 2**30
TFLOPS = 1e12


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator type: peak FLOP/s per dtype, memory, memory bandwidth."""

    name: str
    peak_flops: Mapping[str, float]
    memory_bytes: float
    memory_bandwidth_bytes_per_s: float

    def flops_for(self, dtype: str) -> float:
        return self.peak_flops.get(dtype) or self.peak_flops["fp32"]


@dataclass(frozen=True)
class LinkSpec:
    """A link class: per-device bandwidth in one direction, and latency."""

    bandwidth_bytes_per_s: float
    latency_s: float


DEVICES = {
    # NVIDIA A100 datasheet (2021): FP32 19.5 TF, TF32 156 TF, BF16/FP16 312 TF;
    # 40GB HBM2 at 1,555 GB/s, 80GB HBM2e at 2,039 GB/s (SXM).
    "A100-40GB": DeviceSpec("A100-40GB", {"fp32": 19.5 * TFLOPS, "tf32": 156 * TFLOPS,
                                          "bf16": 312 * TFLOPS}, 40 * GB, 1555 * GB),
    "A100-80GB": DeviceSpec("A100-80GB", {"fp32": 19.5 * TFLOPS, "tf32": 156 * TFLOPS,
                                          "bf16": 312 * TFLOPS}, 80 * GB, 2039 * GB),
    # NVIDIA H100 SXM datasheet (2023): FP32 67 TF, TF32 494.5 TF, BF16 989.5 TF; 80GB at 3.35 TB/s.
    "H100-80GB": DeviceSpec("H100-80GB", {"fp32": 67 * TFLOPS, "tf32": 494.5 * TFLOPS,
                                          "bf16": 989.5 * TFLOPS}, 80 * GB, 3350 * GB),
    # NVIDIA V100 SXM2 datasheet (2020): FP32 15.7 TF, FP16 tensor 125 TF; 900 GB/s HBM2.
    "V100-16GB": DeviceSpec("V100-16GB", {"fp32": 15.7 * TFLOPS, "fp16": 125 * TFLOPS},
                            16 * GB, 900 * GB),
    "V100-32GB": DeviceSpec("V100-32GB", {"fp32": 15.7 * TFLOPS, "fp16": 125 * TFLOPS},
                            32 * GB, 900 * GB),
    # A nominal CPU core set, used by Cluster.local() for planning local process groups.
    "cpu": DeviceSpec("cpu", {"fp32": 0.1 * TFLOPS}, 16 * GB, 20 * GB),
}

# NVLink 3 (A100): 600 GB/s total per GPU, 300 GB/s each way; NVLink 4 (H100): 900 / 450.
# DGX A100: 8 x 200 Gb/s HDR InfiniBand = 25 GB/s per GPU; DGX H100: 8 x 400 Gb/s NDR = 50 GB/s.
PRESETS = {
    "dgx-a100": dict(device="A100-80GB", count=8,
                     intra=LinkSpec(300 * GB, 2e-6), inter=LinkSpec(25 * GB, 5e-6)),
    "dgx-h100": dict(device="H100-80GB", count=8,
                     intra=LinkSpec(450 * GB, 2e-6), inter=LinkSpec(50 * GB, 5e-6)),
}

# Local gloo over loopback: measured figures replace these once Cluster.local() probes.
LOCAL_LINK = LinkSpec(2 * GB, 50e-6)


@dataclass(frozen=True)
class NodeSpec:
    """``count`` devices of one type, joined by the ``intra_node`` link."""

    device: DeviceSpec
    count: int
    intra_node: LinkSpec


@dataclass(frozen=True)
class Cluster:
    """Nodes in rank order and the link between nodes."""

    nodes: tuple
    inter_node: LinkSpec
    name: str = "cluster"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def world_size(self) -> int:
        return sum(n.count for n in self.nodes)

    def devices(self) -> list:
        return [n.device for n in self.nodes for _ in range(n.count)]

    @classmethod
    def preset(cls, name: str, nodes: int = 1, devices_per_node: int | None = None) -> "Cluster":
        """A cluster of ``nodes`` identical machines of a known kind, e.g. ``"dgx-a100"``."""
        if name not in PRESETS:
            raise PlanError(f"unknown cluster preset {name!r}; known: {sorted(PRESETS)} "
                            f"(closest: {closest(name, PRESETS)})")
        if not isinstance(nodes, int) or nodes < 1:
            raise PlanError(f"nodes={nodes!r} must be a positive int")
        spec = PRESETS[name]
        count = spec["count"] if devices_per_node is None else devices_per_node
        if not isinstance(count, int) or not 1 <= count <= spec["count"]:
            raise PlanError(f"devices_per_node={devices_per_node!r}: a {name} node holds "
                            f"1 to {spec['count']} devices")
        node = NodeSpec(DEVICES[spec["device"]], count, spec["intra"])
        return cls((node,) * nodes, spec["inter"], name=f"{nodes} x {name}")

    @classmethod
    def local(cls, world_size: int | None = None) -> "Cluster":
        """This machine as ``world_size`` CPU processes (gloo over loopback).

        ``world_size`` defaults to the torch.distributed world size when a process group is
        initialized, else to the ``WORLD_SIZE`` environment variable set by torchrun.
        """
        if world_size is None:
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                world_size = dist.get_world_size()
            elif os.environ.get("WORLD_SIZE"):
                world_size = int(os.environ["WORLD_SIZE"])
            else:
                raise PlanError("Cluster.local() cannot tell the world size: torch.distributed "
                                "is not initialized and WORLD_SIZE is unset; pass world_size=N")
        if not isinstance(world_size, int) or world_size < 1:
            raise PlanError(f"world_size={world_size!r} must be a positive int")
        node = NodeSpec(DEVICES["cpu"], world_size, LOCAL_LINK)
        return cls((node,), LOCAL_LINK, name=f"local x {world_size}")

    @classmethod
    def from_dict(cls, d: Mapping) -> "Cluster":
        """Build from the cluster-file schema::

            {"nodes": [{"device": "A100-80GB", "count": 8}, ...],
             "links": {"intra_node": {"bandwidth_GBps": 300, "latency_us": 2},
                       "inter_node": {"bandwidth_GBps": 25, "latency_us": 5}},
             "devices": {"MyAccel": {"peak_tflops": {"fp32": 60}, "memory_GB": 96,
                                     "memory_bandwidth_GBps": 4000}}}
        """
        if not isinstance(d, Mapping) or "nodes" not in d:
            raise PlanError("a cluster description needs a 'nodes' list, e.g. "
                            "{'nodes': [{'device': 'A100-80GB', 'count': 8}]}")
        devices = dict(DEVICES)
        for name, spec in (d.get("devices") or {}).items():
            try:
                devices[name] = DeviceSpec(
                    name, {k: v * TFLOPS for k, v in spec["peak_tflops"].items()},
                    spec["memory_GB"] * GB, spec["memory_bandwidth_GBps"] * GB)
            except KeyError as e:
                raise PlanError(f"device type {name!r} lacks {e.args[0]!r}; give peak_tflops, "
                                "memory_GB and memory_bandwidth_GBps") from None
        links = d.get("links") or {}
        intra = _link(links.get("intra_node"), "links.intra_node", LinkSpec(300 * GB, 2e-6))
        inter = _link(links.get("inter_node"), "links.inter_node", LinkSpec(25 * GB, 5e-6))
        nodes = []
        for i, n in enumerate(d["nodes"]):
            dev = n.get("device")
            if dev not in devices:
                raise PlanError(f"nodes[{i}]: unknown device type {dev!r}; known: "
                                f"{sorted(devices)} (closest: {closest(str(dev), devices)}); "
                                "describe new types under 'devices'")
            count = n.get("count", 1)
            if not isinstance(count, int) or count < 1:
                raise PlanError(f"nodes[{i}]: count={count!r} must be a positive int")
            own = _link(n.get("intra_node"), f"nodes[{i}].intra_node", intra)
            nodes.append(NodeSpec(devices[dev], count, own))
        if not nodes:
            raise PlanError("the cluster has no nodes; list at least one under 'nodes'")
        return cls(tuple(nodes), inter, name=d.get("name", "cluster"))

    @classmethod
    def load(cls, path) -> "Cluster":
        """Read a YAML or JSON cluster file (the schema of :meth:`from_dict`)."""
        text = open(path).read()
        if str(path).endswith(".json"):
            return cls.from_dict(json.loads(text))
        import yaml
        return cls.from_dict(yaml.safe_load(text))

    def __str__(self) -> str:
        return f"{self.name} ({self.world_size} devices)"


def _link(d, where: str, default: LinkSpec) -> LinkSpec:
    if d is None:
        return default
    try:
        return LinkSpec(d["bandwidth_GBps"] * GB, d.get("latency_us", 0) * 1e-6)
    except (KeyError, TypeError):
        raise PlanError(f"{where}={d!r}: write a link as "
                        "{'bandwidth_GBps': 300, 'latency_us': 2}") from None
