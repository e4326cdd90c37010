"""Measure this machine for ``Cluster.local()``, and cache what was measured.

What the cost model needs of this machine, each the best of a few runs so that a passing
hiccup does not count:

- compute: fp32 ``torch.mm`` of two MATMUL_N x MATMUL_N matrices, 2 N^3 FLOPs, on all usable
  CPUs (the machine's figure; where the rates of a world of n were not timed below,
  ``Cluster.local(n)`` gives each of n processes a 1/n share);
- memory bandwidth: copying a COPY_BYTES tensor, counted as read plus write (STREAM's "copy");
- rates against size, on one thread as each process of a local world runs: the share of
  the MATMUL_N rate smaller matmuls sustain (MATMUL_SIZES), and of the COPY_BYTES rate
  smaller copies reach (COPY_SIZES: those that fit in a cache go faster), the device's
  matmul and copy curves;
- the framework's time per op, forward and backward, beyond its arithmetic;
- link: gloo all-reduce between local processes, either two processes started for the purpose
  or, inside an initialized process group, the group's own ranks. Latency is a tiny all-reduce's
  time over 2(n-1), the ring's message count; bandwidth is the NCCL-tests "bus bandwidth",
  bytes x 2(n-1)/n / time, so both read directly as the alpha and beta of the cost model;
- what each process of a local world sustains while all of them compute at once (matmul and
  copy, one thread each): the cores and the memory are shared;
- point to point: a ping-pong between two processes, as pipeline stages hand values on;
- overlap: the share of an asynchronous all-reduce that computing at the same time hides
  (bucketed gradient sums run during backward);
- the fixed cost of a collective call inside a program: a loop of small matmuls with a tiny
  all-reduce after each, against the same loop without, less the all-reduce's messages. It
  is what a call costs beyond its messages: issuing and waiting for it, and the ranks
  meeting at it (a rank that ran late makes the others wait; on a busy machine, often).

Results are cached as JSON in ``$AUTOPAR_CACHE_DIR`` or ``~/.cache/autopar/``, one file per
host name, CPU count and torch version, and measured again once older than MAX_AGE_S (a
shared machine's speed drifts). ``python -m autopar.cost.probe`` prints this machine's
figures and their age (``--refresh`` measures again).

This module imports only torch and the standard library: it is also the script that each
probe process runs (``probe.py --worker RANK WORLD PORT``), started with subprocess
rather than torch.multiprocessing because spawn re-imports the caller's ``__main__``, which
would re-run a user's script that calls ``Cluster.local()`` without a main guard.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

MATMUL_N = 2048            # large enough for BLAS to reach its steady rate; ~0.1 s on 2 cores
MATMUL_RUNS = 5
MATMUL_SIZES = (32, 64, 128, 256, 512, 1024)   # smaller square matmuls, for the curve
COPY_BYTES = 2**27         # 128 MiB, far beyond any last-level cache
COPY_RUNS = 5
COPY_SIZES = (2**14, 2**16, 2**18, 2**20, 2**22, 2**24)   # smaller copies, for the curve
CURVE_SECONDS = 0.02       # each point of a curve times at least this much work per run
CALL_LOOP = 200            # matmuls in the call-overhead loop, a tiny all-reduce after each
CALL_MATMUL_N = 128
CALL_RUNS = 5
OVERLAP_BYTES = 2**22      # the all-reduce of the overlap probe: a gradient bucket's size
OVERLAP_MATMUL_N = 256
OVERLAP_MATMULS = 40
OVERLAP_RUNS = 9
MAX_AGE_S = 7 * 24 * 3600  # cached figures older than a week are measured again
MAX_LINK_RANKS = 16        # worlds up to this size get the link timed over their own count
WORLD_MATMUL_N = 1024      # the rates every process of a world sustains at once
WORLD_COPY_BYTES = 2**26
WORLD_RUNS = 9
P2P_BYTES = (4, 2**16, 2**20, 2**22)   # point-to-point sizes, sent and sent back
P2P_RUNS = 7
# All-reduce sizes (bytes) timed one by one between barriers; latency and bandwidth are the
# least-squares fit of t = 2(n-1) latency + 2(n-1)/n bytes / bandwidth over their medians,
# so per-message costs that a one-float probe misses are part of the latency.
ALLREDUCE_BYTES = (4, 4096, 2**16, 2**20, 2**22)
ALLREDUCE_RUNS = 7
OP_RUNS = 2000             # tiny ops timed for the per-op overhead
PROBE_PROCESSES = 2
PROBE_TIMEOUT_S = 120      # a stuck probe process is killed after this
NOMINAL_MEMORY_BYTES = 16e9   # when the OS will not say how much memory there is

# Set when the cache file's format changes, so that older files are measured again.
CACHE_VERSION = 5

measurements_taken = 0     # probes run by this process: tests check that the cache is used
link_probes_taken = 0      # worlds of probe processes started by this process


@dataclass(frozen=True)
class Measurement:
    """What the probe found on one machine (compute and memory for the whole machine)."""

    peak_flops: float
    memory_bandwidth_bytes_per_s: float
    memory_bytes: float
    link_bandwidth_bytes_per_s: float | None   # None where the link probe failed
    link_latency_s: float | None
    link_ranks: int        # processes in the all-reduce probe; 0: it failed
    num_threads: int
    op_overhead_s: float   # framework time per op (and its backward) beyond its arithmetic
    host: str
    cpu_count: int
    torch_version: str
    probe_s: float
    # ((FLOPs, share of peak_flops), ...) and ((bytes, share of the memory bandwidth), ...)
    matmul_curve: tuple = ()
    copy_curve: tuple = ()
    call_overhead_s: float | None = None   # per collective call, beyond its messages
    overlap: float | None = None           # share of an all-reduce computing hides
    measured_at: float = 0.0               # time.time() when measured
    # what one thread sustains on the largest matmul and copy (a process of one thread
    # gets no more, whatever its share of the machine)
    thread_flops: float | None = None
    thread_copy_bytes_per_s: float | None = None
    # what each of the link probe's processes sustained while all of them computed at once
    # (one thread each): matmul FLOP/s and copy bytes/s
    world_flops: float | None = None
    world_copy_bytes_per_s: float | None = None
    # a point-to-point transfer between two of the probe's processes
    p2p_bandwidth_bytes_per_s: float | None = None
    p2p_latency_s: float | None = None
    # the same over other numbers of processes: (ranks, bandwidth, latency, call overhead,
    # overlap, world FLOP/s, world copy bytes/s, p2p bandwidth, p2p latency) each (a local world of more processes than
    # cores computes and runs its collectives slower than two processes do)
    links: tuple = ()

    def link_for(self, ranks: int) -> tuple:
        """(bandwidth, latency, call overhead, overlap, world FLOP/s, world copy bytes/s,
        p2p bandwidth, p2p latency, ranks timed) as timed over ``ranks`` processes where they
        were, else over the probe's own."""
        for r, *figures in self.links:
            if r == ranks:
                return (*figures, r)
        return (self.link_bandwidth_bytes_per_s, self.link_latency_s, self.call_overhead_s,
                self.overlap, self.world_flops, self.world_copy_bytes_per_s,
                self.p2p_bandwidth_bytes_per_s, self.p2p_latency_s, self.link_ranks)
    source: str = "measured now"

    @property
    def age_s(self) -> float:
        return max(0.0, time.time() - self.measured_at)

    def to_json(self) -> str:
        d = asdict(self)
        del d["source"]  # where it came from is a fact about this copy, not the machine
        return json.dumps({"version": CACHE_VERSION, **d}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str) -> "Measurement":
        d = json.loads(text)
        if d.pop("version", None) != CACHE_VERSION:
            raise ValueError("cache file from another autopar version")
        d["source"] = source
        d["matmul_curve"] = tuple(tuple(p) for p in d.get("matmul_curve", ()))
        d["copy_curve"] = tuple(tuple(p) for p in d.get("copy_curve", ()))
        d["links"] = tuple(tuple(p) for p in d.get("links", ()))
        return cls(**d)


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cache_path() -> str:
    """The cache file for this host, CPU count and torch version."""
    root = os.environ.get("AUTOPAR_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "autopar")
    key = f"{socket.gethostname()}-{usable_cpus()}cpu-torch{torch.__version__}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return os.path.join(root, f"local-{safe}.json")


def load_cached(path: str | None = None) -> Measurement | None:
    """The cached measurement, or None if there is none (or it is unreadable or stale)."""
    path = path or cache_path()
    try:
        with open(path) as f:
            m = Measurement.from_json(f.read(), source=f"cached in {path}")
    except (OSError, ValueError, TypeError):
        return None
    here = (socket.gethostname(), usable_cpus(), torch.__version__)
    if (m.host, m.cpu_count, m.torch_version) != here or m.age_s > MAX_AGE_S:
        return None
    return m


def save(m: Measurement, path: str | None = None) -> None:
    path = path or cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(m.to_json())
        os.replace(tmp, path)  # atomic: concurrent readers see the old file or the new one
    except OSError as e:
        warnings.warn(f"autopar: cannot cache the local measurement at {path} ({e}); it will "
                      "be measured again next time; set AUTOPAR_CACHE_DIR to a writable folder",
                      stacklevel=3)


def local_measurement(refresh: bool = False, ranks: int | None = None) -> Measurement:
    """This machine's figures: from the cache, else measured now and cached. With
    ``ranks``, the link is also timed over that many processes (once; cached with the
    rest), for a world of that size: see :meth:`Measurement.link_for`.

    Inside an initialized process group this is collective: rank 0 loads or measures and
    broadcasts, so every rank gets the same figures; the link is timed over the group.
    """
    if dist.is_available() and dist.is_initialized():
        return _shared_measurement(refresh)
    m = None if refresh else load_cached()
    if m is None:
        m = measure()
        if m.link_ranks:  # a failed link probe is tried again next time
            save(m)
    if ranks is not None and m.link_ranks and m.link_for(ranks)[-1] != ranks and \
            2 <= ranks <= MAX_LINK_RANKS:
        try:
            bandwidth, latency, timed, *rest = spawn_allreduce_probe(ranks)
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            warnings.warn(f"autopar: could not time gloo all-reduce over {ranks} local "
                          f"processes ({e}); planning with the figures of {m.link_ranks}",
                          stacklevel=3)
            return m
        m = dataclasses.replace(m, links=m.links + ((timed, bandwidth, latency, *rest),))
        save(m)
    return m


def _shared_measurement(refresh: bool) -> Measurement:
    rank = dist.get_rank()
    box = [None if refresh or rank else load_cached()]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        return box[0]
    link = None  # a group of one has no link to time: measure() then starts probe processes
    if dist.get_world_size() > 1:
        group = None if "gloo" in str(dist.get_backend()) else dist.new_group(backend="gloo")
        link = time_link(group)  # every rank takes part; rank 0's timing is kept
    box = [measure(link) if rank == 0 else None]
    if rank == 0 and box[0].link_ranks:
        save(box[0])
    dist.broadcast_object_list(box, src=0)
    return box[0]


def measure(link: tuple | None = None) -> Measurement:
    """Measure now: compute and memory here, and the ``link`` figures (all-reduce bandwidth,
    latency, ranks, call overhead) given, or else from two probe processes started for it."""
    global measurements_taken
    measurements_taken += 1
    start = time.perf_counter()
    with _threads(usable_cpus()):
        peak_flops = _matmul_flops()
        memory_bandwidth = _copy_bandwidth()
        threads = torch.get_num_threads()
        op_overhead = _op_overhead_s()
    with _threads(1):   # as each process of a local world runs (torchrun sets one thread)
        thread_flops, matmul_curve = _curve(_matmul_rate, MATMUL_SIZES + (MATMUL_N,),
                                            lambda n: 2.0 * n**3)
        thread_copy, copy_curve = _curve(_copy_rate, COPY_SIZES + (COPY_BYTES,),
                                         lambda b: 2.0 * b)
    if link is None:
        link = _spawned_link()
    bandwidth, latency, ranks, call_overhead, overlap, world_flops, world_copy, p2p_bw, \
        p2p_latency = link
    return Measurement(peak_flops, memory_bandwidth, _memory_bytes(), bandwidth, latency, ranks,
                       threads, op_overhead, socket.gethostname(), usable_cpus(),
                       torch.__version__, time.perf_counter() - start, matmul_curve,
                       copy_curve, call_overhead, overlap, time.time(), thread_flops,
                       thread_copy, world_flops, world_copy, p2p_bw, p2p_latency)


def _spawned_link() -> tuple:
    try:
        return spawn_allreduce_probe(PROBE_PROCESSES)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        warnings.warn(f"autopar: could not time gloo all-reduce between local processes ({e}); "
                      "planning with nominal link figures, and not caching them", stacklevel=4)
        return None, None, 0, None, None, None, None, None, None


@contextlib.contextmanager
def _threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _best_s(fn, runs: int) -> float:
    fn()  # warm-up: first-touch page faults, BLAS thread start
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _matmul_flops() -> float:
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    out = torch.empty(MATMUL_N, MATMUL_N)
    return 2 * MATMUL_N**3 / _best_s(lambda: torch.mm(a, b, out=out), MATMUL_RUNS)


def _copy_bandwidth() -> float:
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / _best_s(lambda: dst.copy_(src), COPY_RUNS)


def _curve(rate, sizes, work) -> tuple:
    """(the rate at the last size, ((work at each size, its rate as a share of that), ...))."""
    rates = [rate(size) for size in sizes]
    return rates[-1], tuple((work(size), r / rates[-1]) for size, r in zip(sizes, rates))


def _repeats(seconds_each: float) -> int:
    return max(1, int(CURVE_SECONDS / max(seconds_each, 1e-9)))


def _matmul_rate(n: int) -> float:
    """FLOP/s of an n x n matmul, timed over enough repeats to take CURVE_SECONDS."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    once = _best_s(lambda: torch.mm(a, b, out=out), 1)
    k = _repeats(once)

    def run():
        for _ in range(k):
            torch.mm(a, b, out=out)
    return 2 * n**3 * k / _best_s(run, 3)


def _copy_rate(num_bytes: int) -> float:
    """Bytes/s (read plus write) of copying ``num_bytes``, repeated as :func:`_matmul_rate`."""
    src = torch.ones(max(1, num_bytes // 4))
    dst = torch.empty_like(src)
    once = _best_s(lambda: dst.copy_(src), 1)
    k = _repeats(once)

    def run():
        for _ in range(k):
            dst.copy_(src)
    return 2 * num_bytes * k / _best_s(run, 3)


def _op_overhead_s() -> float:
    """Seconds per tiny op, forward and backward, with autograd recording: what every op
    costs here before its arithmetic."""
    x = torch.ones(8, requires_grad=True)

    def ops():
        y = x
        for _ in range(OP_RUNS):
            y = y * 1.0
        y.sum().backward()

    return _best_s(ops, 3) / OP_RUNS


def _memory_bytes() -> float:
    """Physical memory, or the container's cgroup limit where that is lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = NOMINAL_MEMORY_BYTES
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            with open(limit_file) as f:
                total = min(total, int(f.read().strip()))  # "max" (no limit) fails int()
    return float(total)


def time_link(group=None) -> tuple:
    """(bus bandwidth bytes/s, latency s, ranks, call overhead s, overlap, FLOP/s, copy
    bytes/s, p2p bandwidth bytes/s, p2p latency s) over ``group``: the all-reduce figures of
    :func:`time_allreduce`, the fixed cost of a collective call inside a program
    (:func:`time_call_overhead`), the share of an all-reduce that computing at the same time
    hides (:func:`time_overlap`), what each rank sustains while all compute at once
    (:func:`time_world_rates`) and a point-to-point transfer (:func:`time_p2p`); every rank
    of the group calls it."""
    bandwidth, latency, n = time_allreduce(group)
    return (bandwidth, latency, n, time_call_overhead(latency, group), time_overlap(group),
            *time_world_rates(group), *time_p2p(group))


def time_p2p(group=None) -> tuple:
    """(bandwidth bytes/s, latency s) of a point-to-point transfer (a pipeline's hand-off
    between stages) between the group's first two ranks: half a ping-pong's median time over
    P2P_BYTES, fitted as latency + bytes / bandwidth; the other ranks wait."""
    import numpy as np
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
        times.append(sorted(runs[1:])[len(runs) // 2])
    a = np.array([[1.0, b] for b in P2P_BYTES])
    (latency, inv_bw), *_ = np.linalg.lstsq(a, np.array(times), rcond=None)
    latency = max(float(latency), min(times) / 4)
    if inv_bw <= 0:
        inv_bw = max(times) / max(P2P_BYTES)
    fitted = torch.tensor([1 / inv_bw, latency], dtype=torch.float64)
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
    import numpy as np
    a = np.array([[2 * (n - 1), 2 * (n - 1) / n * b] for b in sizes], dtype=float)
    (alpha, inv_beta), *_ = np.linalg.lstsq(a, np.array(times, dtype=float), rcond=None)
    alpha = max(alpha, min(times) / (2 * (n - 1)) / 4)
    if inv_beta <= 0:  # all sizes cost alike: take the largest at face value
        inv_beta = max(times) / (2 * (n - 1) / n * max(sizes))
    return float(alpha), float(1 / inv_beta)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def spawn_allreduce_probe(nprocs: int = PROBE_PROCESSES) -> tuple:
    """Start ``nprocs`` processes on a free loopback port and time gloo all-reduce among them."""
    global link_probes_taken
    link_probes_taken += 1
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
    d = json.loads(outs[0][0].strip().splitlines()[-1])
    return (d["bandwidth_bytes_per_s"], d["latency_s"], d["ranks"], d["call_overhead_s"],
            d["overlap"], d["flops"], d["copy_bytes_per_s"], d["p2p_bandwidth_bytes_per_s"],
            d["p2p_latency_s"])


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
        bandwidth, latency, ranks, call_overhead, overlap, flops, copy, p2p_bw, p2p_latency = \
            time_link()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"bandwidth_bytes_per_s": bandwidth, "latency_s": latency,
                          "ranks": ranks, "call_overhead_s": call_overhead,
                          "overlap": overlap, "flops": flops, "copy_bytes_per_s": copy,
                          "p2p_bandwidth_bytes_per_s": p2p_bw, "p2p_latency_s": p2p_latency}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m autopar.cost.probe",
                                     description="Measure this machine for Cluster.local().")
    parser.add_argument("--refresh", action="store_true", help="measure again, ignoring the cache")
    parser.add_argument("--world-size", type=int, default=2, help="processes to describe")
    parser.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return
    if args.refresh:
        local_measurement(refresh=True)
    from autopar import Cluster
    print(Cluster.local(args.world_size).describe())


if __name__ == "__main__":
    main()
