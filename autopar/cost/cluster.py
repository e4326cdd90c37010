"""The cluster model: nodes of devices in rank order and the links between them, read from
presets, cluster files or this machine's measurements. The device types, link classes and
presets with their datasheet figures are in :mod:`autopar.cost.hardware`.

Four ways to get a cluster::

    Cluster.preset("p4d.24xlarge", nodes=2)      # a known machine, below in PRESETS
    Cluster.load("cluster.yaml")                 # a file; see Cluster.from_dict for the schema
    Cluster.local(2)                             # this machine, measured once and cached
    Cluster.preset("dgx-h100") + Cluster.preset("p4d.24xlarge")   # heterogeneous
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Mapping

from ..errors import PlanError, closest
from .hardware import (DEFAULT_INTER_NODE, DEFAULT_INTRA_NODE, DEVICES, DTYPE_FALLBACK, GB,
                       LOCAL_LINK, PRESETS, TFLOPS, DeviceSpec, LinkSpec)



@dataclass(frozen=True)
class NodeSpec:
    """``count`` devices of one type, joined by the ``intra_node`` link."""

    device: DeviceSpec
    count: int
    intra_node: LinkSpec


@dataclass(frozen=True)
class Cluster:
    """Nodes in rank order and the link between nodes.

    >>> c = Cluster.preset("dgx-a100", nodes=2)
    >>> c.world_size, c.devices()[0].name
    (16, 'A100-80GB')
    """

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
        """``nodes`` identical machines of a known kind: one of ``PRESETS``, e.g. "dgx-a100",
        "p4d.24xlarge"; ``devices_per_node`` uses only the first devices of each."""
        spec = PRESETS[_lookup(name, PRESETS, "cluster preset")]
        _check_count(nodes, "nodes")
        count = spec.count if devices_per_node is None else devices_per_node
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= spec.count:
            raise PlanError(f"devices_per_node={devices_per_node!r}: a {name} node holds "
                            f"1 to {spec.count} devices")
        node = NodeSpec(DEVICES[spec.device], count, spec.intra_node)
        return cls((node,) * nodes, spec.inter_node, name=f"{nodes} x {name}")

    @classmethod
    def local(cls, world_size: int | None = None, measure: bool = True) -> "Cluster":
        """This machine as ``world_size`` CPU processes talking gloo over loopback.

        ``world_size`` defaults to the torch.distributed world size when a process group is
        initialized, else to the ``WORLD_SIZE`` environment variable set by torchrun.

        With ``measure=True`` the figures are this machine's: fp32 matmul FLOP/s and memory
        bandwidth as each of ``world_size`` processes sustains them while all compute at
        once (else a 1/world_size share of the machine's), a 1/world_size share of the
        memory, the bandwidth and latency of a gloo all-reduce between that many local
        processes and what a collective call costs beyond them, rates against size, and the
        framework's time per op (see :mod:`autopar.cost.probe`). They are measured once (a
        few seconds; a world size not seen before times its link again) and cached as JSON
        under ``$AUTOPAR_CACHE_DIR`` or ``~/.cache/autopar/``, keyed by host name, CPU count
        and torch version, for a week; delete the file or run ``python -m autopar.cost.probe
        --refresh`` to measure again. Inside an initialized process group every rank must
        call this together: rank 0 loads or measures (the all-reduce over the existing
        group) and broadcasts, so all ranks plan with the same figures. ``measure=False``
        gives fixed nominal figures without probing (the same on every machine: what tests
        that want reproducible plans should use).
        """
        world_size = _local_world_size(world_size)
        if not measure:
            node = NodeSpec(DEVICES["cpu"], world_size, LOCAL_LINK)
            return cls((node,), LOCAL_LINK, name=f"local x {world_size}")
        # (imported here: `python -m autopar.cost.probe` must find the module not yet run)
        from .probe import local_measurement
        m = local_measurement(ranks=world_size)
        t = m.link_for(world_size)
        if t is not None and t.ranks == world_size:   # timed with this many at once
            flops, copy = t.flops, t.copy_bytes_per_s
        else:
            flops = _process_rate(m.peak_flops, m.thread_flops, world_size, m.cpu_count)
            copy = _process_rate(m.memory_bandwidth_bytes_per_s, m.thread_copy_bytes_per_s,
                                 world_size, m.cpu_count)
        device = DeviceSpec("cpu", {"fp32": flops}, m.memory_bytes / world_size, copy,
                            measured=True, op_overhead_s=m.op_overhead_s,
                            matmul_curve=m.matmul_curve, copy_curve=m.copy_curve)
        link = LOCAL_LINK if t is None else \
            LinkSpec(t.bandwidth_bytes_per_s, t.latency_s, call_overhead_s=t.call_overhead_s,
                     p2p_bandwidth_bytes_per_s=t.p2p_bandwidth_bytes_per_s,
                     p2p_latency_s=t.p2p_latency_s, overlap=t.overlap)
        return cls((NodeSpec(device, world_size, link),), link, name=f"local x {world_size}",
                   extra={"measurement": m})

    @classmethod
    def combine(cls, *clusters: "Cluster", inter_node: LinkSpec | None = None,
                name: str | None = None) -> "Cluster":
        """One cluster of the given clusters' nodes, in order (``a + b`` is the same).

        Traffic between them goes over ``inter_node``, by default the slowest of their own
        inter-node links (least bandwidth, most latency).
        """
        if not clusters or not all(isinstance(c, Cluster) for c in clusters):
            raise PlanError(f"Cluster.combine takes Clusters, got {clusters!r}")
        if inter_node is None:
            inter_node = LinkSpec(min(c.inter_node.bandwidth_bytes_per_s for c in clusters),
                                  max(c.inter_node.latency_s for c in clusters))
        nodes = tuple(n for c in clusters for n in c.nodes)
        return cls(nodes, inter_node, name=name or " + ".join(c.name for c in clusters))

    def node_of(self, rank: int) -> int:
        """The index of the node holding ``rank``."""
        for i, node in enumerate(self.nodes):
            if rank < node.count:
                return i
            rank -= node.count
        raise PlanError(f"rank {rank} is outside the cluster's {self.world_size} devices")

    def part(self, ranks: range) -> "Cluster":
        """The devices ``ranks`` (contiguous, in rank order) as a cluster of their own: the
        part of each node they hold, the same links (a pipeline stage's devices)."""
        nodes, start = [], 0
        for node in self.nodes:
            lo, hi = max(ranks.start, start), min(ranks.stop, start + node.count)
            if lo < hi:
                nodes.append(NodeSpec(node.device, hi - lo, node.intra_node))
            start += node.count
        if sum(n.count for n in nodes) != len(ranks):
            raise PlanError(f"ranks {ranks.start}..{ranks.stop - 1} are not all in the "
                            f"cluster of {self.world_size} devices")
        return Cluster(tuple(nodes), self.inter_node,
                       name=f"{self.name} [{ranks.start}..{ranks.stop - 1}]", extra=self.extra)

    def __add__(self, other: "Cluster") -> "Cluster":
        if not isinstance(other, Cluster):
            return NotImplemented
        return Cluster.combine(self, other)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Cluster":
        """Build from the cluster-file schema (YAML or JSON; sizes in GB = 1e9 bytes)::

            name: my-cluster             # optional
            nodes:                       # in rank order; each node holds `count` devices
              - {device: A100-80GB, count: 8}
              - {device: V100-16GB, count: 4, intra_node: {bandwidth_GBps: 150, latency_us: 3}}
            links:                       # optional; per device, one direction
              intra_node: {bandwidth_GBps: 300, latency_us: 2}
              inter_node: {bandwidth_GBps: 25, latency_us: 5}
            devices:                     # optional: types not built in (or overriding one)
              MyAccel: {peak_tflops: {fp32: 60, bf16: 500}, memory_GB: 96,
                        memory_bandwidth_GBps: 4000}   # measured: true, for sustained rates

        A node's ``intra_node`` overrides ``links.intra_node``; links left out default to
        DGX A100's (NVSwitch 300 GB/s within a node, 25 GB/s InfiniBand between).

        Calibrated figures, where known, go beside the datasheet ones: a device may give
        ``matmul_efficiency`` and ``memory_efficiency`` (the shares of its peaks it
        sustains, in place of the cost model's MATMUL_EFFICIENCY and MEMORY_EFFICIENCY),
        ``op_overhead_us`` (per op, forward and backward), and ``matmul_curve`` /
        ``copy_curve`` (``[[FLOPs or bytes, share], ...]``, the share sustained at each
        size); a link may give ``call_overhead_us`` (per collective call, beyond its
        messages), ``overlap`` (the share of the gradient sums run during backward that
        the backend hides, 0 to 1), and ``p2p_bandwidth_GBps`` / ``p2p_latency_us`` (a
        point-to-point transfer, as pipeline stages hand values on).
        """
        if not isinstance(d, Mapping) or "nodes" not in d:
            raise PlanError("a cluster description needs a 'nodes' list, e.g. "
                            "{'nodes': [{'device': 'A100-80GB', 'count': 8}]}")
        _check_keys(d, ("name", "nodes", "links", "devices"), "the cluster description")
        devices = dict(DEVICES)
        for dev_name, spec in _mapping(d.get("devices"), "devices").items():
            devices[dev_name] = _device(dev_name, spec)
        links = _mapping(d.get("links"), "links")
        _check_keys(links, ("intra_node", "inter_node"), "links")
        intra = _link(links.get("intra_node"), "links.intra_node", DEFAULT_INTRA_NODE)
        inter = _link(links.get("inter_node"), "links.inter_node", DEFAULT_INTER_NODE)
        if not isinstance(d["nodes"], (list, tuple)) or not d["nodes"]:
            raise PlanError(f"nodes={d['nodes']!r}: list at least one node, e.g. "
                            "[{'device': 'A100-80GB', 'count': 8}]")
        nodes = tuple(_node(n, f"nodes[{i}]", devices, intra) for i, n in enumerate(d["nodes"]))
        return cls(nodes, inter, name=str(d.get("name", "cluster")))

    def to_dict(self) -> dict:
        """The cluster-file form. ``Cluster.from_dict(c.to_dict()) == c`` wherever the figures
        have at most 12 significant digits (all built-in ones do; measured ones are rounded)."""
        seen, custom = {}, {}
        for n in self.nodes:
            dev = n.device
            if seen.setdefault(dev.name, dev) != dev:
                raise PlanError(f"two different device types are named {dev.name!r}; give them "
                                "different names (DeviceSpec.name) before writing the cluster")
            if DEVICES.get(dev.name) != dev:
                custom[dev.name] = {
                    "peak_tflops": {k: _tidy(v / TFLOPS) for k, v in dev.peak_flops.items()},
                    "memory_GB": _tidy(dev.memory_bytes / GB),
                    "memory_bandwidth_GBps": _tidy(dev.memory_bandwidth_bytes_per_s / GB),
                    **({"measured": True} if dev.measured else {}), **_calibration(dev)}
        out = {"name": self.name,
               "nodes": [{"device": n.device.name, "count": n.count,
                          "intra_node": _link_dict(n.intra_node)} for n in self.nodes],
               "links": {"inter_node": _link_dict(self.inter_node)}}
        if custom:
            out["devices"] = custom
        return out

    @classmethod
    def load(cls, path) -> "Cluster":
        """Read a YAML or JSON cluster file (the schema of :meth:`from_dict`)."""
        with open(path) as f:
            text = f.read()
        if str(path).endswith(".json"):
            parse, errors = json.loads, (ValueError,)
        else:
            import yaml
            parse, errors = yaml.safe_load, (yaml.YAMLError,)
        try:
            data = parse(text)
        except errors as e:
            raise PlanError(f"cannot parse cluster file {path}: {e}") from None
        return cls.from_dict(data)

    def describe(self) -> str:
        """Every node's devices and links, and for a measured local cluster how it was measured.
        """
        lines = [f"{self.name}: {self.world_size} devices"]
        first = 0
        for i, n in enumerate(self.nodes):
            if i + 1 < len(self.nodes) and self.nodes[i + 1] == n:
                continue  # print a run of identical nodes once
            where = f"node {i}" if first == i else f"nodes {first}-{i}, each"
            lines.append(f"  {where}: {n.count} x {_device_line(n.device)}; "
                         f"within the node {_link_line(n.intra_node)}")
            first = i + 1
        if len(self.nodes) > 1:
            lines.append(f"  between nodes: {_link_line(self.inter_node)}")
        m = self.extra.get("measurement")
        if m is not None:
            from .probe import MAX_AGE_S
            lines.append(f"  measured on {m.host} ({m.cpu_count} CPUs, torch {m.torch_version}, "
                         f"{m.num_threads} threads) in {m.probe_s:.1f} s: matmul "
                         f"{_si(m.peak_flops, 'FLOP/s')}, copy "
                         f"{_si(m.memory_bandwidth_bytes_per_s, 'B/s')} for the whole machine, "
                         f"each of {self.world_size} processes taking an equal share; "
                         f"{_timed_over(m, self.world_size)}; "
                         f"{m.source}, "
                         f"{_age(m.age_s)} old (measured again past {_age(MAX_AGE_S)}; "
                         "python -m autopar.cost.probe --refresh measures now)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.name} ({self.world_size} devices)"


def _timed_over(m, world_size: int) -> str:
    t = m.link_for(world_size)
    return "no link timed" if t is None else f"the link timed over {t.ranks} processes"


def _process_rate(machine: float, one_thread: float | None, processes: int,
                  cpus: int) -> float:
    """What each of ``processes`` sustains of a ``machine`` rate: its equal share, and no
    more than its threads reach (the CPUs shared out, ``one_thread`` each)."""
    share = machine / processes
    if one_thread is None:
        return share
    return min(share, one_thread * max(1, cpus // processes))


def _age(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.0f} s"


def _local_world_size(world_size) -> int:
    if world_size is None:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            world_size = dist.get_world_size()
        elif os.environ.get("WORLD_SIZE"):
            world_size = int(os.environ["WORLD_SIZE"])
        else:
            raise PlanError("Cluster.local() cannot tell the world size: torch.distributed "
                            "is not initialized and WORLD_SIZE is unset; pass world_size=N")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise PlanError(f"world_size={world_size!r} must be a positive int")
    return world_size


def _lookup(name, table, what: str) -> str:
    """``name`` as a key of ``table``, matched exactly or else ignoring case."""
    if name in table:
        return name
    folded = [k for k in table if isinstance(name, str) and k.lower() == name.lower()]
    if len(folded) == 1:
        return folded[0]
    raise PlanError(f"unknown {what} {name!r}; known: {sorted(table)} "
                    f"(closest: {closest(str(name), table)})")


def _check_count(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{where}={value!r} must be a positive int")


def _check_keys(d: Mapping, allowed, where: str) -> None:
    for key in d:
        if key not in allowed:
            raise PlanError(f"{where}: unknown key {key!r}; expected some of {list(allowed)} "
                            f"(closest: {closest(str(key), allowed)})")


def _mapping(value, where: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PlanError(f"{where}={value!r} must be a mapping")
    return value


def _positive(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise PlanError(f"{where}={value!r} must be a positive number")
    return float(value)


def _node(n, where: str, devices: Mapping, intra: LinkSpec) -> NodeSpec:
    if not isinstance(n, Mapping) or "device" not in n:
        raise PlanError(f"{where}={n!r}: write a node as {{'device': 'A100-80GB', 'count': 8}}")
    _check_keys(n, ("device", "count", "intra_node"), where)
    dev = n["device"]
    if dev not in devices:
        raise PlanError(f"{where}: unknown device type {dev!r}; known: {sorted(devices)} "
                        f"(closest: {closest(str(dev), devices)}); describe new types under "
                        "'devices'")
    count = n.get("count", 1)
    _check_count(count, f"{where}.count")
    return NodeSpec(devices[dev], count, _link(n.get("intra_node"), f"{where}.intra_node", intra))


def _device(name: str, spec) -> DeviceSpec:
    where = f"devices.{name}"
    keys = ("peak_tflops", "memory_GB", "memory_bandwidth_GBps")
    if not isinstance(spec, Mapping) or not all(k in spec for k in keys):
        raise PlanError(f"{where}={spec!r}: give peak_tflops, memory_GB and "
                        "memory_bandwidth_GBps, e.g. {'peak_tflops': {'fp32': 60, 'bf16': 500}, "
                        "'memory_GB': 96, 'memory_bandwidth_GBps': 4000}")
    _check_keys(spec, (*keys, "measured", *_CALIBRATION), where)
    measured = spec.get("measured", False)
    if not isinstance(measured, bool):
        raise PlanError(f"{where}.measured={measured!r} must be true or false")
    tflops = _mapping(spec["peak_tflops"], f"{where}.peak_tflops")
    for dtype in tflops:
        if dtype not in DTYPE_FALLBACK:
            raise PlanError(f"{where}.peak_tflops: unknown dtype {dtype!r}; use "
                            f"{sorted(DTYPE_FALLBACK)} (closest: {closest(str(dtype), DTYPE_FALLBACK)})")
    if "fp32" not in tflops:
        raise PlanError(f"{where}.peak_tflops={dict(tflops)!r} lacks 'fp32', the figure every "
                        "other dtype falls back to")
    peak = {k: _positive(v, f"{where}.peak_tflops.{k}") * TFLOPS for k, v in tflops.items()}
    calibrated = {}
    for key in ("matmul_efficiency", "memory_efficiency"):
        if key in spec:
            calibrated[key] = _positive(spec[key], f"{where}.{key}")
    if "op_overhead_us" in spec:
        calibrated["op_overhead_s"] = _non_negative(spec["op_overhead_us"],
                                                    f"{where}.op_overhead_us") / 1e6
    for key in ("matmul_curve", "copy_curve"):
        if key in spec:
            calibrated[key] = _curve(spec[key], f"{where}.{key}")
    return DeviceSpec(name, peak, _positive(spec["memory_GB"], f"{where}.memory_GB") * GB,
                      _positive(spec["memory_bandwidth_GBps"],
                                f"{where}.memory_bandwidth_GBps") * GB, measured, **calibrated)


_CALIBRATION = ("matmul_efficiency", "memory_efficiency", "op_overhead_us", "matmul_curve",
                "copy_curve")


def _calibration(dev: DeviceSpec) -> dict:
    """A device's calibrated figures as a cluster file writes them (those it has)."""
    out = {k: _tidy(getattr(dev, k)) for k in ("matmul_efficiency", "memory_efficiency")
           if getattr(dev, k) is not None}
    if dev.op_overhead_s is not None:
        out["op_overhead_us"] = _tidy(dev.op_overhead_s * 1e6)
    for k in ("matmul_curve", "copy_curve"):
        if getattr(dev, k):
            out[k] = [[_tidy(size), _tidy(share)] for size, share in getattr(dev, k)]
    return out


def _non_negative(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise PlanError(f"{where}={value!r} must be a number >= 0")
    return float(value)


def _curve(value, where: str) -> tuple:
    example = "[[1e6, 0.4], [1e9, 0.9]] (size, share of the peak sustained at it)"
    if not isinstance(value, (list, tuple)) or not value:
        raise PlanError(f"{where}={value!r}: give a list of points, e.g. {example}")
    points = []
    for i, p in enumerate(value):
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise PlanError(f"{where}[{i}]={p!r}: a point is [size, share], e.g. {example}")
        points.append((_positive(p[0], f"{where}[{i}][0]"), _positive(p[1], f"{where}[{i}][1]")))
    if any(a[0] >= b[0] for a, b in zip(points, points[1:])):
        raise PlanError(f"{where}: sizes must ascend, got {[p[0] for p in points]}")
    return tuple(points)


def _link(d, where: str, default: LinkSpec) -> LinkSpec:
    if d is None:
        return default
    example = "{'bandwidth_GBps': 300, 'latency_us': 2}"
    if not isinstance(d, Mapping) or "bandwidth_GBps" not in d:
        raise PlanError(f"{where}={d!r}: write a link as {example}")
    _check_keys(d, ("bandwidth_GBps", "latency_us", "call_overhead_us", "overlap",
                    "p2p_bandwidth_GBps", "p2p_latency_us"), where)
    latency = d.get("latency_us", 0)
    if isinstance(latency, bool) or not isinstance(latency, (int, float)) or latency < 0:
        raise PlanError(f"{where}.latency_us={latency!r} must be a number >= 0; "
                        f"write a link as {example}")
    call = _non_negative(d.get("call_overhead_us", 0), f"{where}.call_overhead_us")
    overlap = _non_negative(d.get("overlap", 0), f"{where}.overlap")
    if overlap > 1:
        raise PlanError(f"{where}.overlap={overlap!r}: a share of the collective's time, "
                        "from 0 (nothing hidden) to 1 (all of it)")
    p2p = {}
    if "p2p_bandwidth_GBps" in d:
        p2p["p2p_bandwidth_bytes_per_s"] = _positive(d["p2p_bandwidth_GBps"],
                                                     f"{where}.p2p_bandwidth_GBps") * GB
    if "p2p_latency_us" in d:
        p2p["p2p_latency_s"] = _non_negative(d["p2p_latency_us"], f"{where}.p2p_latency_us") / 1e6
    return LinkSpec(_positive(d["bandwidth_GBps"], f"{where}.bandwidth_GBps") * GB,
                    latency / 1e6, call_overhead_s=call / 1e6, overlap=overlap, **p2p)


def _link_dict(link: LinkSpec) -> dict:
    out = {"bandwidth_GBps": _tidy(link.bandwidth_bytes_per_s / GB),
           "latency_us": _tidy(link.latency_s * 1e6)}
    if link.call_overhead_s:
        out["call_overhead_us"] = _tidy(link.call_overhead_s * 1e6)
    if link.overlap:
        out["overlap"] = _tidy(link.overlap)
    if link.p2p_bandwidth_bytes_per_s is not None:
        out["p2p_bandwidth_GBps"] = _tidy(link.p2p_bandwidth_bytes_per_s / GB)
    if link.p2p_latency_s is not None:
        out["p2p_latency_us"] = _tidy(link.p2p_latency_s * 1e6)
    return out


def _tidy(x: float) -> float:
    """``x`` to 12 significant digits: drops the float noise of unit conversion (15 * 1e6 *
    1e-6 is not 15) so that a cluster written and read back compares equal."""
    return float(f"{x:.12g}")


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _device_line(d: DeviceSpec) -> str:
    flops = ", ".join(f"{k} {_si(v, 'FLOP/s')}" for k, v in d.peak_flops.items())
    return (f"{d.name} ({flops}; memory {_si(d.memory_bytes, 'B')} at "
            f"{_si(d.memory_bandwidth_bytes_per_s, 'B/s')})")


def _link_line(link: LinkSpec) -> str:
    call = f", {link.call_overhead_s * 1e6:.3g} us per collective call" \
        if link.call_overhead_s else ""
    call += f", {link.overlap:.0%} of gradient sums hidden by backward" if link.overlap else ""
    if link.p2p_bandwidth_bytes_per_s is not None:
        call += f"; point to point {_si(link.p2p_bandwidth_bytes_per_s, 'B/s')}"
        if link.p2p_latency_s is not None:
            call += f", {link.p2p_latency_s * 1e6:.3g} us"
    return f"{_si(link.bandwidth_bytes_per_s, 'B/s')} per device each way, " \
           f"{link.latency_s * 1e6:.3g} us latency{call}"
