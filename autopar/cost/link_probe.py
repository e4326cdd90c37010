"""Timing the link between local processes, for ``Cluster.local()``
(:mod:`autopar.cost.probe`): what a world of n processes on this machine sees of its
collectives, point-to-point transfers and shared cores.

- all-reduce: latency is a tiny all-reduce's time over 2(n-1), the ring's message count;
  bandwidth is the NCCL-tests "bus bandwidth", bytes x 2(n-1)/n / time, so both read directly
  as the alpha and beta of the cost model;
- the fixed cost of a collective call inside a program: a loop of small matmuls with a tiny
  all-reduce after each, against the same loop without, less the all-reduce's messages. It
  is what a call costs beyond its messages: issuing and waiting for it, and the ranks
  meeting at it (a rank that ran late makes the others wait; on a busy machine, often);
- overlap: the share of an asynchronous all-reduce that computing at the same time hides
  (bucketed gradient sums run during backward);
- what each process sustains while all of them compute at once (matmul and copy, one
  thread each): the cores and the memory are shared;
- point to point: a ping-pong between two processes, as pipeline stages hand values on.

Either the ranks of an initialized process group time it over themselves (:func:`time_link`)
or :func:`spawn` starts n processes for the purpose. This module imports only torch, numpy
and the standard library: it is also the script each of those processes runs
(``link_probe.py --worker RANK WORLD PORT``), started with subprocess rather than
torch.multiprocessing because spawn re-imports the caller's ``__main__``, which would re-run
a user's script that calls ``Cluster.local()`` without a main guard.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

# All-reduce sizes (bytes) timed one by one between barriers; latency and bandwidth are the
# least-squares fit of t = 2(n-1) latency + 2(n-1)/n bytes / bandwidth over their medians,
# so per-message costs that a one-float probe misses are part of the latency.
ALLREDUCE_BYTES = (4, 4096, 2**16, 2**20, 2**22)
ALLREDUCE_RUNS = 7
CALL_LOOP = 200            # matmuls in the call-overhead loop, a tiny all-reduce after each
CALL_MATMUL_N = 128
CALL_RUNS = 5
OVERLAP_BYTES = 2**22      # the all-reduce of the overlap probe: a gradient bucket's size
OVERLAP_MATMUL_N = 256
OVERLAP_MATMULS = 40
OVERLAP_RUNS = 9
WORLD_MATMUL_N = 1024      # the rates every process of a world sustains at once
WORLD_COPY_BYTES = 2**26
WORLD_RUNS = 9
P2P_BYTES = (4, 2**16, 2**20, 2**22)   # point-to-point sizes, sent and sent back
P2P_RUNS = 7
PROBE_TIMEOUT_S = 120      # a stuck probe process is killed after this


@dataclass(frozen=True)
class LinkTiming:
    """What a world of ``ranks`` local processes saw of its link and its shared machine."""

    ranks: int
    bandwidth_bytes_per_s: float      # all-reduce bus bandwidth
    latency_s: float                  # per ring message
    call_overhead_s: float            # per collective call, beyond its messages
    overlap: float                    # share of an async all-reduce computing hides
    flops: float                      # matmul FLOP/s of each process, all computing at once
    copy_bytes_per_s: float           # copy bytes/s of each, the same way
    p2p_bandwidth_bytes_per_s: float  # a point-to-point transfer between two of them
    p2p_latency_s: float


def time_link(group=None) -> LinkTiming:
    """Every figure of :class:`LinkTiming` over ``group``: the all-reduce's
    (:func:`time_allreduce`), the fixed cost of a collective call inside a program
    (:func:`time_call_overhead`), the share of an all-reduce that computing at the same time
    hides (:func:`time_overlap`), what each rank sustains while all compute at once
    (:func:`time_world_rates`) and a point-to-point transfer (:func:`time_p2p`); every rank
    of the group calls it."""
    bandwidth, latency, n = time_allreduce(group)
    call = time_call_overhead(latency, group)
    overlap = time_overlap(group)
    flops, copy = time_world_rates(group)
    p2p_bandwidth, p2p_latency = time_p2p(group)
    return LinkTiming(n, bandwidth, latency, call, overlap, flops, copy, p2p_bandwidth,
                      p2p_latency)


def time_p2p(group=None) -> tuple:
    """(bandwidth bytes/s, latency s) of a point-to-point transfer (a pipeline's hand-off
    between stages) between the group's first two ranks: half a ping-pong's median time over
    P2P_BYTES, fitted as latency + bytes / bandwidth; the other ranks wait."""
    ranks = dist.get_process_group_ranks(group) if group is not None else \
        list(range(dist.get_world_size()))
    me = dist.get_rank()
    times = []
    for num_bytes in P2P_BYTES:
        t = torch.zeros(max(1, num_bytes // 4))
        runs = []
        for _ in range(P2P_RUNS + 1):      # the first is a warm-up
            dist.barrier(group=group)
            start = time.perf_counter()
            if me == ranks[0]:
                dist.send(t, ranks[1], group=group)
                dist.recv(t, ranks[1], group=group)
            elif me == ranks[1]:
                dist.recv(t, ranks[0], group=group)
                dist.send(t, ranks[0], group=group)
            runs.append((time.perf_counter() - start) / 2)
        timed = sorted(runs[1:])
        times.append(timed[len(timed) // 2])
    latency, bandwidth = fit_line(P2P_BYTES, times, messages=1, share=1.0)
    fitted = torch.tensor([bandwidth, latency], dtype=torch.float64)
    dist.broadcast(fitted, src=ranks[0], group=group)   # the sender's timing, for every rank
    return float(fitted[0]), float(fitted[1])


def time_world_rates(group=None) -> tuple:
    """(matmul FLOP/s, copy bytes/s) the slowest rank of ``group`` sustains while every rank
    runs the same at once, each the median of WORLD_RUNS between barriers: what a process of
    a local world computes at during a step, its cores and memory shared with the others."""
    a, b = torch.randn(WORLD_MATMUL_N, WORLD_MATMUL_N), torch.randn(WORLD_MATMUL_N,
                                                                    WORLD_MATMUL_N)
    src = torch.ones(WORLD_COPY_BYTES // 4)
    dst = torch.empty_like(src)
    rates = []
    for work, fn in ((2 * WORLD_MATMUL_N**3, lambda: torch.mm(a, b)),
                     (2 * WORLD_COPY_BYTES, lambda: dst.copy_(src))):
        fn()
        runs = []
        for _ in range(WORLD_RUNS):
            dist.barrier(group=group)
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        rates.append(work / sorted(runs)[len(runs) // 2])
    slowest = torch.tensor(rates, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MIN, group=group)
    return float(slowest[0]), float(slowest[1])


def time_overlap(group=None) -> float:
    """The share of an asynchronous all-reduce (OVERLAP_BYTES) that matmuls run meanwhile
    hide, as bucketed gradient sums run during backward: (compute alone + all-reduce alone
    - both at once) / the shorter of the two, the median of OVERLAP_RUNS, the least over
    the ranks, in [0, 1]
    (0 where running both at once is no faster than one after the other: the cores that
    compute are also those that move the bytes)."""
    a = torch.randn(OVERLAP_MATMUL_N, OVERLAP_MATMUL_N)
    big = torch.zeros(OVERLAP_BYTES // 4)

    def compute():
        for _ in range(OVERLAP_MATMULS):
            torch.mm(a, a)

    def reduce():
        dist.all_reduce(big, group=group)

    def both():
        work = dist.all_reduce(big, group=group, async_op=True)
        compute()
        work.wait()

    shares = []
    for _ in range(OVERLAP_RUNS):   # each run times the three in turn; the median share
        t = {}
        for name, fn in (("compute", compute), ("reduce", reduce), ("both", both)):
            dist.barrier(group=group)
            start = time.perf_counter()
            fn()
            t[name] = time.perf_counter() - start
        hidden = t["compute"] + t["reduce"] - t["both"]
        shares.append(hidden / min(t["compute"], t["reduce"]))
    share = torch.tensor(sorted(shares)[len(shares) // 2], dtype=torch.float64)
    dist.all_reduce(share, op=dist.ReduceOp.MIN, group=group)   # what every rank sees
    return float(min(1.0, max(0.0, share.item())))


def time_call_overhead(latency_s: float, group=None) -> float:
    """Seconds a tiny collective call adds to a program beyond its messages (2(n-1) of
    ``latency_s``): CALL_LOOP matmuls with a tiny all-reduce after each, against the same
    matmuls alone; the least over CALL_RUNS of each, taken in turns."""
    n = dist.get_world_size(group)
    a = torch.randn(CALL_MATMUL_N, CALL_MATMUL_N)
    tiny = torch.zeros(1)

    def loop(call: bool):
        for _ in range(CALL_LOOP):
            torch.mm(a, a)
            if call:
                dist.all_reduce(tiny, group=group)

    alone, called = [], []
    for _ in range(CALL_RUNS):
        for out, call in ((alone, False), (called, True)):
            dist.barrier(group=group)
            start = time.perf_counter()
            loop(call)
            out.append(time.perf_counter() - start)
    per_call = (min(called) - min(alone)) / CALL_LOOP
    return max(0.0, per_call - 2 * (n - 1) * latency_s)


def time_allreduce(group=None) -> tuple:
    """(bus bandwidth bytes/s, latency s, ranks) of gloo all-reduce over ``group``; every rank
    of the group must call it."""
    n = dist.get_world_size(group)
    if n < 2:
        raise RuntimeError("an all-reduce probe needs at least 2 processes")
    times = []
    for num_bytes in ALLREDUCE_BYTES:
        t = torch.zeros(max(1, num_bytes // 4))
        dist.all_reduce(t, group=group)  # warm-up: connections, buffers
        runs = []
        for _ in range(ALLREDUCE_RUNS):
            dist.barrier(group=group)  # so that no rank's time includes waiting for the others
            start = time.perf_counter()
            dist.all_reduce(t, group=group)
            runs.append(time.perf_counter() - start)
        times.append(sorted(runs)[len(runs) // 2])
    latency, bandwidth = fit_alpha_beta(ALLREDUCE_BYTES, times, n)
    return bandwidth, latency, n


def fit_alpha_beta(sizes, times, n: int) -> tuple:
    """(latency s, bandwidth bytes/s) of ring all-reduce fitting ``times`` over ``sizes``:
    t = 2(n-1) latency + 2(n-1)/n bytes / bandwidth, least squares, both kept positive."""
    return fit_line(sizes, times, messages=2 * (n - 1), share=2 * (n - 1) / n)


def fit_line(sizes, times, messages: float, share: float) -> tuple:
    """(latency s, bandwidth bytes/s) fitting t = messages x latency + share x bytes /
    bandwidth to ``times`` over ``sizes`` by least squares, both kept positive."""
    import numpy as np
    a = np.array([[messages, share * b] for b in sizes], dtype=float)
    (alpha, inv_beta), *_ = np.linalg.lstsq(a, np.array(times, dtype=float), rcond=None)
    alpha = max(alpha, min(times) / messages / 4)
    if inv_beta <= 0:  # all sizes cost alike: take the largest at face value
        inv_beta = max(times) / (share * max(sizes))
    return float(alpha), float(1 / inv_beta)


def spawn(nprocs: int) -> LinkTiming:
    """Start ``nprocs`` processes on a free loopback port and time the link among them."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # the probe moves bytes; threads would only compete
    if "GLOO_SOCKET_IFNAME" not in env and any(n == "lo" for _, n in socket.if_nameindex()):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _RUN_WORKER, os.path.abspath(__file__),
                               "--worker", str(r), str(nprocs), str(port)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(nprocs)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=PROBE_TIMEOUT_S))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the all-reduce probe did not finish in {PROBE_TIMEOUT_S} s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"an all-reduce probe process failed: {err.strip()[-800:]}")
    return LinkTiming(**json.loads(outs[0][0].strip().splitlines()[-1]))


# Runs this file as a script without putting autopar/ first on sys.path, where its modules
# (errors.py, mesh.py, ...) could shadow top-level modules of the same name.
_RUN_WORKER = ("import runpy, sys; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        timing = time_link()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(asdict(timing)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A process of the link probe.")
    parser.add_argument("--worker", nargs=3, type=int, required=True)
    _worker(*parser.parse_args().worker)
