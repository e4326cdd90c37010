"""The cluster model: presets, cluster files, heterogeneous clusters, and Cluster.local()'s probe
and cache (measured once per test session in a temporary cache folder)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autopar import Cluster, PlanError
from autopar.cost import link_probe, probe
from autopar.cost.cluster import DEVICES, LOCAL_LINK, PRESETS, DeviceSpec, NodeSpec
from autopar.program.mesh import Mesh
from autopar.cost.model import axis_links

ISSUE_YAML = """\
nodes:                       # in rank order; each node holds `count` devices of one type
  - {device: A100-80GB, count: 8}
  - {device: V100-16GB, count: 4, intra_node: {bandwidth_GBps: 150, latency_us: 3}}
  - {device: MyAccel, count: 2}
links:
  intra_node: {bandwidth_GBps: 300, latency_us: 2}
  inter_node: {bandwidth_GBps: 25, latency_us: 5}
devices:                     # optional: types not built in
  MyAccel: {peak_tflops: {fp32: 60, bf16: 500}, memory_GB: 96, memory_bandwidth_GBps: 4000}
"""

# -- presets -----------------------------------------------------------------------------------

PRESET_MACHINES = {
    "dgx-a100": ("A100-80GB", 8), "dgx-h100": ("H100-80GB", 8),
    "p3.8xlarge": ("V100-16GB", 4), "p3.16xlarge": ("V100-16GB", 8),
    "p3dn.24xlarge": ("V100-32GB", 8), "p4d.24xlarge": ("A100-40GB", 8),
    "p4de.24xlarge": ("A100-80GB", 8), "p5.48xlarge": ("H100-80GB", 8),
    "g4dn.12xlarge": ("T4", 4), "g5.48xlarge": ("A10G", 8), "g6.48xlarge": ("L4", 8),
}


def test_every_preset_is_tested():
    assert set(PRESETS) == set(PRESET_MACHINES)


@pytest.mark.parametrize("name", sorted(PRESET_MACHINES))
def test_preset_has_its_devices_and_links_faster_within_nodes_than_between(name):
    device, count = PRESET_MACHINES[name]
    c = Cluster.preset(name, nodes=3)
    assert c.world_size == 3 * count and str(c) == f"3 x {name} ({3 * count} devices)"
    assert {d.name for d in c.devices()} == {device}
    for node in c.nodes:
        assert node.intra_node.bandwidth_bytes_per_s > c.inter_node.bandwidth_bytes_per_s
        assert node.intra_node.latency_s <= c.inter_node.latency_s


def test_preset_figures_are_the_datasheets():
    assert DEVICES["A100-80GB"].flops_for("bf16") == 312e12
    assert DEVICES["A100-40GB"].memory_bandwidth_bytes_per_s == 1555e9
    assert DEVICES["H100-80GB"].flops_for("tf32") == 494.5e12  # dense: half the sparse 989
    assert DEVICES["L4"].flops_for("fp16") == 121e12
    assert DEVICES["T4"].flops_for("fp32") == 8.1e12 and DEVICES["T4"].memory_bytes == 16e9
    p5 = Cluster.preset("p5.48xlarge")
    assert p5.inter_node.bandwidth_bytes_per_s == 3200e9 / 8 / 8  # 3200 Gbps over 8 GPUs
    assert p5.nodes[0].intra_node.bandwidth_bytes_per_s == 450e9


def test_preset_devices_per_node_and_case_insensitive_name():
    c = Cluster.preset("DGX-H100", nodes=2, devices_per_node=4)
    assert c.world_size == 8 and [n.count for n in c.nodes] == [4, 4]


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="p4d.24xl"), r"unknown cluster preset 'p4d.24xl'.*closest: 'p4d.24xlarge'"),
    (dict(name="dgx-a100", nodes=0), r"nodes=0 must be a positive int"),
    (dict(name="dgx-a100", nodes=1.5), r"nodes=1.5 must be a positive int"),
    (dict(name="p3.8xlarge", devices_per_node=8), r"a p3.8xlarge node holds 1 to 4 devices"),
])
def test_bad_preset_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(PlanError, match=message):
        Cluster.preset(**kwargs)


# -- flops_for ---------------------------------------------------------------------------------

def test_flops_for_falls_back_bf16_to_fp16_to_fp32():
    v100, t4 = DEVICES["V100-16GB"], DEVICES["T4"]
    assert v100.flops_for("bf16") == v100.flops_for("fp16") == 125e12
    assert t4.flops_for("tf32") == t4.flops_for("fp32") == 8.1e12
    only_bf16 = DeviceSpec("X", {"fp32": 1e12, "bf16": 8e12}, 1e9, 1e9)
    assert only_bf16.flops_for("fp16") == 8e12
    fp32_only = DeviceSpec("Y", {"fp32": 1e12}, 1e9, 1e9)
    assert fp32_only.flops_for("bf16") == fp32_only.flops_for("tf32") == 1e12


def test_flops_for_takes_torch_dtypes_and_aliases():
    a100 = DEVICES["A100-40GB"]
    assert a100.flops_for(torch.bfloat16) == a100.flops_for("bfloat16") == 312e12
    assert a100.flops_for(torch.float32) == a100.flops_for("float32") == 19.5e12
    with pytest.raises(PlanError, match=r"no peak FLOP/s figure for dtype 'fp61'.*'fp16'"):
        a100.flops_for("fp61")


def test_device_without_fp32_is_rejected():
    with pytest.raises(PlanError, match="needs a positive fp32 peak"):
        DeviceSpec("Z", {"bf16": 1e12}, 1e9, 1e9)


# -- cluster files -----------------------------------------------------------------------------

def _check_issue_cluster(c):
    assert c.world_size == 14
    assert [d.name for d in c.devices()] == ["A100-80GB"] * 8 + ["V100-16GB"] * 4 + ["MyAccel"] * 2
    a100, v100, mine = c.nodes
    assert a100.intra_node.bandwidth_bytes_per_s == 300e9 and a100.intra_node.latency_s == 2e-6
    assert v100.intra_node.bandwidth_bytes_per_s == 150e9 and v100.intra_node.latency_s == 3e-6
    assert mine.intra_node == a100.intra_node  # links.intra_node is the default per node
    assert c.inter_node.bandwidth_bytes_per_s == 25e9 and c.inter_node.latency_s == 5e-6
    assert mine.device.flops_for("bf16") == 500e12 and mine.device.flops_for("fp16") == 500e12
    assert mine.device.memory_bytes == 96e9
    assert mine.device.memory_bandwidth_bytes_per_s == 4000e9


def test_yaml_and_json_files_with_mixed_and_custom_devices(tmp_path):
    import yaml
    (tmp_path / "c.yaml").write_text(ISSUE_YAML)
    (tmp_path / "c.json").write_text(json.dumps(yaml.safe_load(ISSUE_YAML)))
    from_yaml, from_json = Cluster.load(tmp_path / "c.yaml"), Cluster.load(tmp_path / "c.json")
    _check_issue_cluster(from_yaml)
    assert from_yaml == from_json
    assert Cluster.from_dict(from_yaml.to_dict()) == from_yaml


def test_unparsable_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("nodes: [{device: T4, count: 2}\n")
    with pytest.raises(PlanError, match="cannot parse cluster file .*bad.yaml"):
        Cluster.load(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text("{'nodes': []}")
    with pytest.raises(PlanError, match="cannot parse cluster file .*bad.json"):
        Cluster.load(tmp_path / "bad.json")


T4 = {"device": "T4", "count": 2}
ACCEL = {"peak_tflops": {"fp32": 60}, "memory_GB": 96, "memory_bandwidth_GBps": 4000}


@pytest.mark.parametrize("d, message", [
    ({}, r"needs a 'nodes' list"),
    ({"nodes": []}, r"list at least one node"),
    ({"nodes": [{"device": "A100", "count": 8}]},
     r"nodes\[0\]: unknown device type 'A100'.*closest: .*'A100-80GB'"),
    ({"nodes": [T4, {"device": "T4", "count": 0}]}, r"nodes\[1\].count=0 must be a positive int"),
    ({"nodes": [{"device": "T4", "count": "2"}]}, r"nodes\[0\].count='2' must be a positive int"),
    ({"nodes": [{"device": "T4", "cuont": 2}]}, r"nodes\[0\]: unknown key 'cuont'.*'count'"),
    ({"nodes": ["T4"]}, r"nodes\[0\]='T4': write a node as"),
    ({"nodes": [T4], "link": {}}, r"unknown key 'link'.*closest: 'links'"),
    ({"nodes": [T4], "links": {"inter_node": {"latency_us": 5}}},
     r"links.inter_node=\{'latency_us': 5\}: write a link as \{'bandwidth_GBps': 300"),
    ({"nodes": [T4], "links": {"intra_node": 300}}, r"links.intra_node=300: write a link as"),
    ({"nodes": [T4], "links": {"intra_node": {"bandwidth_GBps": -1}}},
     r"links.intra_node.bandwidth_GBps=-1 must be a positive number"),
    ({"nodes": [T4], "links": {"inter_node": {"bandwidth_GBps": 1, "latency_us": -2}}},
     r"links.inter_node.latency_us=-2 must be a number >= 0"),
    ({"nodes": [T4], "links": {"inter": {"bandwidth_GBps": 1}}}, r"closest: 'inter_node'"),
    ({"nodes": [{**T4, "intra_node": {"bandwidth_Gbps": 1}}]}, r"nodes\[0\].intra_node=.*write a"),
    ({"nodes": [T4], "devices": {"X": {"peak_tflops": {"fp32": 1}}}},
     r"devices.X=.*give peak_tflops, memory_GB and memory_bandwidth_GBps"),
    ({"nodes": [T4], "devices": {"X": {**ACCEL, "peak_tflops": {"bf16": 9}}}},
     r"devices.X.peak_tflops=\{'bf16': 9\} lacks 'fp32'"),
    ({"nodes": [T4], "devices": {"X": {**ACCEL, "peak_tflops": {"fp32": 1, "bf61": 9}}}},
     r"unknown dtype 'bf61'.*closest: 'bf16'"),
    ({"nodes": [T4], "devices": {"X": {**ACCEL, "memory_GB": 0}}},
     r"devices.X.memory_GB=0 must be a positive number"),
    ({"nodes": [T4], "devices": {"X": {**ACCEL, "measured": "yes"}}},
     r"devices.X.measured='yes' must be true or false"),
])
def test_bad_cluster_description_is_a_clear_error(d, message):
    with pytest.raises(PlanError, match=message):
        Cluster.from_dict(d)


# -- heterogeneous clusters --------------------------------------------------------------------

def test_combined_clusters_keep_node_order_and_cross_the_slowest_network():
    c = Cluster.preset("dgx-h100") + Cluster.preset("p4d.24xlarge", nodes=2)
    assert c.world_size == 24
    assert [n.device.name for n in c.nodes] == ["H100-80GB", "A100-40GB", "A100-40GB"]
    assert c.inter_node == Cluster.preset("p4d.24xlarge").inter_node  # 50 Gb/s per GPU, EFA
    assert Cluster.from_dict(c.to_dict()) == c
    dp_link, tp_link = axis_links(c, Mesh(("dp", "tp"), (3, 8)))
    assert tp_link.bandwidth_bytes_per_s == 300e9  # NVLink3, the slower of the two nodes'
    assert dp_link == c.inter_node
    twin = DeviceSpec("H100-80GB", {"fp32": 1e12}, 1e9, 1e9)  # same name, other figures
    with pytest.raises(PlanError, match="two different device types are named 'H100-80GB'"):
        Cluster.combine(c, Cluster((NodeSpec(twin, 1, LOCAL_LINK),), LOCAL_LINK)).to_dict()
    described = c.describe()
    assert "node 0: 8 x H100-80GB" in described and "nodes 1-2, each: 8 x A100-40GB" in described


# -- Cluster.local -----------------------------------------------------------------------------

def test_local_without_measuring_is_nominal_and_probes_nothing(monkeypatch):
    before = probe.measurements_taken
    c = Cluster.local(3, measure=False)
    assert c.world_size == 3 and c.nodes[0].intra_node == LOCAL_LINK == c.inter_node
    assert c.devices()[0] == DEVICES["cpu"] and probe.measurements_taken == before
    monkeypatch.setenv("WORLD_SIZE", "5")
    assert Cluster.local(measure=False).world_size == 5
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(PlanError, match="cannot tell the world size.*pass world_size=N"):
        Cluster.local(measure=False)
    with pytest.raises(PlanError, match="world_size=0 must be a positive int"):
        Cluster.local(0, measure=False)


def test_local_measures_once_then_loads_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(tmp_path))
    before = probe.measurements_taken
    two = Cluster.local(2)
    assert probe.measurements_taken == before + 1
    assert os.path.exists(probe.cache_path()) and str(tmp_path) in probe.cache_path()
    links = probe.link_probes_taken
    four = Cluster.local(4)
    assert probe.measurements_taken == before + 1  # loaded, not measured again
    # ... but the link timed again over 4 processes, as a world of 4 runs, and cached
    assert probe.link_probes_taken == links + 1
    m = four.extra["measurement"]
    assert [t.ranks for t in m.links] == [2, 4]
    assert Cluster.local(4).nodes[0].intra_node == four.nodes[0].intra_node
    assert probe.link_probes_taken == links + 1   # the second time from the cache
    assert m.source.startswith("cached in")
    assert m.peak_flops > 1e9 and m.memory_bandwidth_bytes_per_s > 1e8  # > 1 GFLOP/s, 100 MB/s
    assert m.memory_bytes > 1e8
    assert two.devices()[0].measured and not Cluster.local(2, measure=False).devices()[0].measured
    for c, n in ((two, 2), (four, 4)):
        t, link = m.link_for(n), c.nodes[0].intra_node
        assert t.ranks == n and c.inter_node == link
        # the link is the one timed over n processes, every figure of it
        assert t.bandwidth_bytes_per_s > 1e8 and 0 < t.latency_s < 1e-2
        assert t.p2p_bandwidth_bytes_per_s > 1e7 and 0 < t.p2p_latency_s < 1e-2
        assert t.call_overhead_s >= 0 and 0 <= t.overlap <= 1
        assert (link.bandwidth_bytes_per_s, link.latency_s, link.call_overhead_s,
                link.overlap, link.p2p_bandwidth_bytes_per_s, link.p2p_latency_s) == (
            t.bandwidth_bytes_per_s, t.latency_s, t.call_overhead_s, t.overlap,
            t.p2p_bandwidth_bytes_per_s, t.p2p_latency_s)
        # each of n processes computes at what it sustained while all n of them did, a
        # fraction of the machine's
        assert c.devices()[0].flops_for("fp32") == t.flops
        assert c.devices()[0].memory_bandwidth_bytes_per_s == t.copy_bytes_per_s
        assert 1e9 < t.flops < m.peak_flops
        assert 1e8 < t.copy_bytes_per_s < 2 * m.memory_bandwidth_bytes_per_s
        assert f"the link timed over {n} processes" in c.describe()
    # without those (a probe of another world size), 1/n of the machine and no more than
    # its threads reach
    threads = lambda n: max(1, m.cpu_count // n)  # noqa: E731
    from autopar.cost.cluster import _process_rate
    assert _process_rate(m.peak_flops, m.thread_flops, 2, m.cpu_count) == pytest.approx(
        min(m.peak_flops / 2, m.thread_flops * threads(2)))
    # rates against size, measured on one thread: shares of the largest size's rate
    for curve in (m.matmul_curve, m.copy_curve):
        assert len(curve) >= 5 and curve[-1][1] == 1.0
        assert all(a[0] < b[0] for a, b in zip(curve, curve[1:]))
    assert m.matmul_curve[0][1] < 1 and two.devices()[0].matmul_curve == m.matmul_curve
    assert 0 <= m.age_s < 600 and "old (measured again past 7 days" in four.describe()
    assert "measured on" in four.describe() and "cached in" in four.describe()
    again = Cluster.from_dict(json.loads(json.dumps(two.to_dict())))
    assert again.devices()[0].measured and again.nodes[0].intra_node.latency_s == pytest.approx(
        m.link_for(2).latency_s, rel=1e-9)


def test_stale_or_broken_cache_files_are_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(tmp_path))
    path = probe.cache_path()
    with open(path, "w") as f:
        f.write("{not json")
    assert probe.load_cached() is None
    m = probe.Measurement(1e9, 1e9, 1e9, 1, 2e-5, "another-host", probe.usable_cpus(),
                          torch.__version__, 1.0, measured_at=time.time() - 3600)
    probe.save(m)
    assert probe.load_cached() is None  # measured on another host
    here = dataclasses.replace(m, host=socket.gethostname())
    probe.save(here)
    assert probe.load_cached().peak_flops == 1e9
    assert 3500 < probe.load_cached().age_s < 3700
    # older than MAX_AGE_S: measured again rather than trusted
    probe.save(dataclasses.replace(here, measured_at=time.time() - probe.MAX_AGE_S - 60))
    assert probe.load_cached() is None


def _rank_main(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        first, second = Cluster.local(), Cluster.local()
    finally:
        dist.destroy_process_group()
    result = {"first": first.to_dict(), "second": second.to_dict(),
              "ranks": first.extra["measurement"].link_for(2).ranks,
              "measured": probe.measurements_taken}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.processes
def test_ranks_of_a_process_group_share_one_measurement(monkeypatch, tmp_path):
    """Rank 0 measures (the all-reduce over the group itself) and broadcasts; the second call
    loads rank 0's cache; every rank gets the same figures."""
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(tmp_path / "cache"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(2, port, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["first"] == r1["first"] == r0["second"] == r1["second"]
    assert r0["ranks"] == 2 and (r0["measured"], r1["measured"]) == (1, 0)
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_alpha_beta_fit_recovers_latency_and_bandwidth():
    sizes = [4, 4096, 2**16, 2**20, 2**22]
    n, latency, bandwidth = 2, 150e-6, 1.5e9
    times = [2 * (n - 1) * latency + 2 * (n - 1) / n * b / bandwidth for b in sizes]
    got_latency, got_bandwidth = link_probe.fit_alpha_beta(sizes, times, n)
    assert got_latency == pytest.approx(latency, rel=1e-6)
    assert got_bandwidth == pytest.approx(bandwidth, rel=1e-6)
