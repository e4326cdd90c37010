"""The cost model against closed forms: alpha-beta collectives, the redistribution table's
forward and backward, rooflines, work split, memory per parameter, links per mesh axis."""

from __future__ import annotations

import pytest

from autopar import Cluster, Partial, PlanError, Replicate, Shard
from autopar.cost.model import (BACKWARD_FACTOR_CONTRACTION, KERNEL_LAUNCH_S, MATMUL_EFFICIENCY,
                          MEMORY_EFFICIENCY, CostModel, Training, axis_links)
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
