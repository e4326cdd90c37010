"""The cost model against closed forms: alpha-beta collectives, the redistribution table's
forward and backward, rooflines, work split, memory per parameter, links per mesh axis."""

from __future__ import annotations

import pytest

from autopar import Cluster, Partial, PlanError, Replicate, Shard
from autopar.cost.model import (BACKWARD_FACTOR_CONTRACTION, BUCKET_BYTES, KERNEL_LAUNCH_S,
                                MATMUL_EFFICIENCY, MEMORY_EFFICIENCY, CostModel, Training,
                                axis_links)
from autopar.program.mesh import Mesh

R, P, S0, S1 = Replicate(), Partial(), Shard(0), Shard(1)
DGX = Cluster.preset("dgx-a100")
NVLINK = DGX.nodes[0].intra_node
BW, LAT = NVLINK.bandwidth_bytes_per_s, NVLINK.latency_s
MB = 2**20


def model(shape=(8,), cluster=DGX, **training):
    names = ("dp", "sp", "tp")[-len(shape):] if len(shape) > 1 else ("dp",)
    return CostModel(cluster, Mesh(names, shape), Training(**training))


def test_ring_all_reduce_and_halves():
    m, n, b = model(), 8, 64 * MB
    assert m.collective_s("all_reduce", 0, b) == pytest.approx(
        2 * (n - 1) / n * b / BW + 2 * (n - 1) * LAT)
    for kind in ("all_gather", "reduce_scatter"):
        assert m.collective_s(kind, 0, b) == pytest.approx((n - 1) / n * b / BW + (n - 1) * LAT)
    assert m.collective_s("all_to_all", 0, b) == pytest.approx((n - 1) / n * b / BW
                                                               + (n - 1) * LAT)


@pytest.mark.parametrize("src,dst,fwd,bwd", [
    ((S0,), (R,), "all_gather", None),            # backward: own slice, free
    ((R,), (S0,), None, "all_gather"),            # forward: own slice, free
    ((P,), (R,), "all_reduce", None),             # backward: identity
    ((P,), (S0,), "reduce_scatter", "all_gather"),
    ((S0,), (S1,), "all_to_all", "all_to_all"),
    ((R,), (P,), None, None),
])
def test_redistribution_prices_forward_and_backward(src, dst, fwd, bwd):
    m, b = model(), 64 * MB
    one = {k: m.collective_s(k, 0, b) if k else 0.0 for k in (fwd, bwd)}
    assert m.redistribute_s(b, src, dst) == pytest.approx(one[fwd] + one[bwd])
    assert m.redistribute_s(b, src, dst, grad=False) == pytest.approx(one[fwd])


def test_collectives_on_one_axis_move_the_bytes_split_by_the_others():
    m, b = model((2, 4)), 64 * MB
    # gathering over the inner axis a value already split in two by the outer one
    assert m.redistribute_s(b, (S1, S0), (S1, R), grad=False) == pytest.approx(
        m.collective_s("all_gather", 1, b / 2))


def test_gradient_sum_all_reduces_or_reduce_scatters_when_fused():
    m, b = model(), 64 * MB
    assert m.grad_sum_s(b, (R,), 0, fused=False) == pytest.approx(
        m.collective_s("all_reduce", 0, b))
    assert m.grad_sum_s(b, (R,), 0, fused=True) == pytest.approx(
        m.collective_s("reduce_scatter", 0, b))


def test_compute_roofline_forward_and_backward():
    m = model()
    peak = DGX.devices()[0].flops_for("fp32") * MATMUL_EFFICIENCY
    bw = DGX.devices()[0].memory_bandwidth_bytes_per_s * MEMORY_EFFICIENCY
    flops, b = 2 * 4096**3, 3 * 4096**2 * 4
    # a big matmul is compute bound; split 8 ways by its output
    assert m.compute_s("matmul", flops, b, [(S0,), (R,)], (S0,)) == pytest.approx(
        flops / 8 / peak * (1 + BACKWARD_FACTOR_CONTRACTION) + KERNEL_LAUNCH_S)
    # an elementwise op is bandwidth bound; backward about one more pass
    assert m.compute_s("gelu", 1e6, 8e9, [(R,)], (R,)) == pytest.approx(
        8e9 / bw * 2 + KERNEL_LAUNCH_S)
    assert m.compute_s("view", 0, 8e9, [(R,)], (R,)) == 0.0


def test_work_split_counts_split_contractions_not_partial_pass_through():
    m = model((2, 4))
    assert m.work_split([(R, S1), (R, S1)], (R, P)) == 4    # contracted dim split on tp
    assert m.work_split([(R, P), (R, P)], (R, P)) == 1      # partial sums added: whole work
    assert m.work_split([(S0, R)], (S0, R)) == 2


def test_slowest_device_sets_compute():
    mixed = Cluster.from_dict({"nodes": [{"device": "A100-80GB", "count": 4},
                                         {"device": "V100-16GB", "count": 4}]})
    m = CostModel(mixed, Mesh(("dp",), (8,)))
    v100 = mixed.devices()[-1]
    assert m.peak_flops == pytest.approx(v100.flops_for("fp32") * MATMUL_EFFICIENCY)
    assert m.memory_bytes == v100.memory_bytes


@pytest.mark.parametrize("precision,optimizer,per_element", [
    ("fp32", "adamw", 16.0), ("fp32", "sgd", 8.0), ("bf16-mixed", "adamw", 18.0)])
def test_bytes_per_parameter(precision, optimizer, per_element):
    t = Training(precision, optimizer)
    assert t.bytes_per_parameter(True, 4) == per_element
    assert t.bytes_per_parameter(False, 4) == 4.0


def test_bad_training_settings_are_clear_errors():
    with pytest.raises(PlanError, match="precision='fp8'"):
        Training("fp8")
    with pytest.raises(PlanError, match="optimizer='lion'"):
        Training(optimizer="lion")


def test_axes_are_priced_by_the_slowest_link_they_cross():
    two = Cluster.preset("dgx-a100", nodes=2, devices_per_node=4)
    outer, inner = axis_links(two, Mesh(("dp", "tp"), (2, 4)))
    assert outer == two.inter_node and inner == two.nodes[0].intra_node
    [flat] = axis_links(two, Mesh(("dp",), (8,)))
    assert flat == two.inter_node
    swapped = axis_links(two, Mesh(("dp", "tp"), (4, 2)))
    assert swapped == [two.inter_node, two.nodes[0].intra_node]


def test_measured_devices_are_not_discounted():
    from dataclasses import replace
    nominal = Cluster.local(2, measure=False)
    node = nominal.nodes[0]
    measured = replace(nominal, nodes=(replace(node, device=replace(node.device,
                                                                    measured=True)),))
    peak = node.device.flops_for("fp32")
    assert CostModel(nominal, Mesh(("dp",), (2,))).peak_flops == pytest.approx(
        peak * MATMUL_EFFICIENCY)
    assert CostModel(measured, Mesh(("dp",), (2,))).peak_flops == pytest.approx(peak)


def test_edge_prices_agree_pair_by_pair_and_by_blocks_in_any_order():
    """A table prices a pair alone or in a block of pairs; whichever comes first, the two
    agree exactly (the gradient sums a pair implies included)."""
    from itertools import product
    from autopar.search.pricing import Facts
    mesh = Mesh(("dp", "tp"), (2, 4))
    model = CostModel(Cluster.preset("dgx-a100"), mesh)
    layouts = list(product([R, S0, S1], repeat=2))

    def priced(pairs_first: bool):
        prices = Facts().prices(mesh, model)
        ids = [prices.layout_id(lay) for lay in layouts]
        dsts = [(need, prices.grad_sum_axes(True, need, out)) for need in ids for out in ids]
        assert any(axes for _, axes in dsts)
        table = prices.table(3e7, True, True, False)
        alone = {}
        if pairs_first:   # half the pairs alone, in reverse, before any block
            alone = {(i, j): table[(ids[i], dsts[j])] for i in range(0, len(ids), 2)
                     for j in reversed(range(len(dsts)))}
        block = table.matrix(ids, dsts)
        alone.update({(i, j): table[(ids[i], dsts[j])] for i in range(len(ids))
                      for j in range(len(dsts))})
        return block, alone

    for pairs_first in (True, False):
        block, alone = priced(pairs_first)
        assert all(block[i, j] == v for (i, j), v in alone.items())
    assert (priced(True)[0] == priced(False)[0]).all()


# -- calibration: a device's and a link's own figures ------------------------------------------

def _calibrated(device=None, link=None, count=2):
    """A local cluster whose device and link take the given calibrated fields."""
    from dataclasses import replace
    nominal = Cluster.local(count, measure=False)
    node = nominal.nodes[0]
    dev = replace(node.device, **(device or {}))
    lnk = replace(node.intra_node, **(link or {}))
    return replace(nominal, nodes=(replace(node, device=dev, intra_node=lnk),), inter_node=lnk)


def test_a_cluster_files_efficiencies_replace_the_defaults():
    c = _calibrated({"matmul_efficiency": 0.5, "memory_efficiency": 0.25})
    m = CostModel(c, Mesh(("dp",), (2,)))
    dev = c.devices()[0]
    assert m.peak_flops == pytest.approx(dev.flops_for("fp32") * 0.5)
    assert m.memory_bandwidth == pytest.approx(dev.memory_bandwidth_bytes_per_s * 0.25)


def test_rates_against_size_are_read_off_the_curves():
    """A matmul of a size whose curve point says 10% of the peak is priced at 10% of it;
    between points the share is interpolated on log size, held past the ends; a copy that
    fits in a cache (share 3) is priced three times faster; ops that are not contractions
    take no matmul share."""
    curves = {"matmul_curve": ((1e6, 0.1), (1e10, 1.0)), "copy_curve": ((1e4, 3.0), (1e9, 1.0))}
    m = CostModel(_calibrated(curves), Mesh(("dp",), (2,)))
    flat = CostModel(_calibrated(), Mesh(("dp",), (2,)))
    launch = flat.op_overhead_s
    work = lambda cm, op, f, b: cm.compute_s(op, f, b, [(R,)], (R,)) - launch  # noqa: E731
    assert work(m, "matmul", 1e6, 1.0) == pytest.approx(10 * work(flat, "matmul", 1e6, 1.0))
    assert work(m, "matmul", 1e4, 1.0) == pytest.approx(10 * work(flat, "matmul", 1e4, 1.0))
    assert work(m, "matmul", 1e12, 1.0) == pytest.approx(work(flat, "matmul", 1e12, 1.0))
    # halfway in log size between the points: halfway in share
    assert work(m, "matmul", 1e8, 1.0) == pytest.approx(work(flat, "matmul", 1e8, 1.0) / 0.55)
    assert work(m, "gelu", 1.0, 1e4) == pytest.approx(work(flat, "gelu", 1.0, 1e4) / 3)
    assert work(m, "gelu", 1.0, 1e10) == pytest.approx(work(flat, "gelu", 1.0, 1e10))


def test_a_links_call_overhead_is_paid_once_per_collective_call():
    m = CostModel(_calibrated(link={"call_overhead_s": 1e-3}), Mesh(("dp",), (2,)))
    flat = CostModel(_calibrated(), Mesh(("dp",), (2,)))
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
        assert m.collective_s(kind, 0, 4 * MB) == pytest.approx(
            flat.collective_s(kind, 0, 4 * MB) + 1e-3)
    # a gradient summed in a bucket with others pays its share of the bucket's call
    share = MB / BUCKET_BYTES
    assert m.grad_sum_s(MB, (R,), 0, fused=False, bucketed=True) == pytest.approx(
        flat.grad_sum_s(MB, (R,), 0, fused=False, bucketed=True) + share * 1e-3)
    assert m.collective_s("all_reduce", 0, 0.0) > 0 and m.collective_s("identity", 0, MB) == 0


def test_bucketed_gradient_sums_pay_what_the_link_does_not_hide():
    """A link that hides 75% of what runs beside backward: a parameter's bucketed gradient
    sum costs a quarter; a sum inside the program (not bucketed) or fused into a
    reduce-scatter runs when its value is needed, and costs in full."""
    m = CostModel(_calibrated(link={"overlap": 0.75}), Mesh(("dp",), (2,)))
    flat = CostModel(_calibrated(), Mesh(("dp",), (2,)))
    assert m.grad_sum_s(64 * MB, (R,), 0, fused=False, bucketed=True) == pytest.approx(
        0.25 * flat.grad_sum_s(64 * MB, (R,), 0, fused=False, bucketed=True))
    for fused, bucketed in ((False, False), (True, True), (True, False)):
        assert m.grad_sum_s(64 * MB, (R,), 0, fused=fused, bucketed=bucketed) == \
            pytest.approx(flat.grad_sum_s(64 * MB, (R,), 0, fused=fused, bucketed=bucketed))


@pytest.fixture
def fake_probe(monkeypatch, tmp_path):
    """Cluster.local() reads a measurement of this machine from a cache written here, with
    the figures a test gives: no probe runs."""
    import dataclasses
    import socket
    import time

    import torch

    from autopar.cost import probe
    from autopar.cost.link_probe import LinkTiming
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(tmp_path))
    base = probe.Measurement(
        peak_flops=2e11, memory_bandwidth_bytes_per_s=4e10, memory_bytes=1.6e10, num_threads=2,
        op_overhead_s=1e-5, host=socket.gethostname(), cpu_count=probe.usable_cpus(),
        torch_version=torch.__version__, probe_s=1.0, measured_at=time.time())
    link = LinkTiming(ranks=2, bandwidth_bytes_per_s=1e9, latency_s=1e-4, call_overhead_s=0.0,
                      overlap=0.0, flops=1e11, copy_bytes_per_s=2e10,
                      p2p_bandwidth_bytes_per_s=1e9, p2p_latency_s=1e-4)

    def write(call_overhead_s=0.0, **figures):
        probe.save(dataclasses.replace(base, links=(dataclasses.replace(
            link, call_overhead_s=call_overhead_s),), **figures))
        before = probe.measurements_taken
        cluster = Cluster.local(2)
        assert probe.measurements_taken == before   # read from the cache: nothing measured
        return cluster
    return write


def test_overheads_the_probe_measures_show_up_in_the_plans_prices(fake_probe):
    """The same plan (its mesh and layouts pinned) priced with a probe that measured no call
    overhead and one that measured 2 ms per call: the communication grows by 2 ms per call
    the plan makes; an op overhead 1 ms larger grows compute by 1 ms per op that runs."""
    import torch
    import torch.nn as nn

    import autopar

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 64)

        def forward(self, x):
            return self.fc2(self.fc1(x).relu()).pow(2).mean()

    x = torch.randn(32, 64)
    pins = dict(mesh={"tp": 2}, constraints={"fc1.weight": "S(0)", "fc1.bias": "S(0)",
                                             "fc2.weight": "S(1)", "fc2.bias": "R", "x": "R"})

    def plan(cluster):
        return autopar.plan(Mlp(), cluster, example_inputs=(x,), **pins)

    quiet = plan(fake_probe(call_overhead_s=0.0))
    busy = plan(fake_probe(call_overhead_s=2e-3))
    assert [v["output"] for v in busy.nodes.values()] == \
        [v["output"] for v in quiet.nodes.values()]
    calls = (busy.cost.comm_s - quiet.cost.comm_s) / 2e-3
    assert calls >= 1 and calls == pytest.approx(round(calls), abs=1e-6)
    slow_ops = plan(fake_probe(call_overhead_s=0.0, op_overhead_s=1e-5 + 1e-3))
    ops = (slow_ops.cost.compute_s - quiet.cost.compute_s) / 1e-3
    assert ops >= 4 and ops == pytest.approx(round(ops), abs=1e-6)
    # what the probe found shows in the cluster's description
    assert "2e+03 us per collective call" in fake_probe(call_overhead_s=2e-3).describe()


def test_cluster_files_take_calibrated_figures_and_refuse_bad_ones():
    d = {"nodes": [{"device": "Acc", "count": 2,
                    "intra_node": {"bandwidth_GBps": 100, "latency_us": 3,
                                   "call_overhead_us": 40, "overlap": 0.5,
                                   "p2p_bandwidth_GBps": 20, "p2p_latency_us": 9}}],
         "devices": {"Acc": {"peak_tflops": {"fp32": 50}, "memory_GB": 40,
                             "memory_bandwidth_GBps": 2000, "matmul_efficiency": 0.6,
                             "memory_efficiency": 0.9, "op_overhead_us": 7,
                             "matmul_curve": [[1e6, 0.2], [1e9, 0.9]]}}}
    c = Cluster.from_dict(d)
    dev, link = c.devices()[0], c.nodes[0].intra_node
    assert dev.matmul_efficiency == 0.6 and dev.memory_efficiency == 0.9
    assert dev.op_overhead_s == pytest.approx(7e-6)
    assert dev.matmul_curve == ((1e6, 0.2), (1e9, 0.9)) and dev.copy_curve == ()
    assert link.call_overhead_s == pytest.approx(40e-6) and link.overlap == 0.5
    assert link.p2p_bandwidth_bytes_per_s == 20e9 and link.p2p_latency_s == pytest.approx(9e-6)
    # a pipeline's hand-off between stages goes point to point: priced with those figures
    from autopar.search.stages import transfer_seconds
    assert transfer_seconds(1e6, link) == pytest.approx(9e-6 + 1e6 / 20e9)
    plain = Cluster.preset("dgx-a100").nodes[0].intra_node
    assert transfer_seconds(1e6, plain) == pytest.approx(
        plain.latency_s + 1e6 / plain.bandwidth_bytes_per_s)
    assert Cluster.from_dict(c.to_dict()) == c
    bad = [({"matmul_efficiency": 0}, "devices.Acc.matmul_efficiency=0"),
           ({"op_overhead_us": -1}, "devices.Acc.op_overhead_us=-1 must be a number >= 0"),
           ({"matmul_curve": [[1e9, 0.5], [1e6, 0.2]]}, "sizes must ascend"),
           ({"copy_curve": [[1e6]]}, r"copy_curve\[0\]=\[1000000.0\]: a point is \[size, share\]"),
           ({"matmul_curve": "fast"}, "give a list of points")]
    for extra, message in bad:
        spec = {**d["devices"]["Acc"], **extra}
        with pytest.raises(PlanError, match=message):
            Cluster.from_dict({**d, "devices": {"Acc": spec}})
    node = d["nodes"][0]
    with pytest.raises(PlanError, match=r"nodes\[0\].intra_node.overlap=1.5: a share"):
        Cluster.from_dict({**d, "nodes": [{**node, "intra_node": {
            **node["intra_node"], "overlap": 1.5}}]})
