"""Measure this machine for ``Cluster.local()``, and cache what was measured.

What the cost model needs of this machine, each the best of a few runs so that a passing
hiccup does not count:

- compute: fp32 ``torch.mm`` of two MATMUL_N x MATMUL_N matrices, 2 N^3 FLOPs, on all usable
  CPUs (the machine's figure; where the rates of a world of n were not timed,
  ``Cluster.local(n)`` gives each of n processes a 1/n share);
- memory bandwidth: copying a COPY_BYTES tensor, counted as read plus write (STREAM's "copy");
- rates against size, on one thread as each process of a local world runs: the share of
  the MATMUL_N rate smaller matmuls sustain (MATMUL_SIZES), and of the COPY_BYTES rate
  smaller copies reach (COPY_SIZES: those that fit in a cache go faster), the device's
  matmul and copy curves;
- the framework's time per op, forward and backward, beyond its arithmetic;
- the link between local processes and what they sustain together
  (:mod:`autopar.cost.link_probe`), either two processes started for the purpose or,
  inside an initialized process group, the group's own ranks; and again over n processes
  the first time a world of n asks.

Results are cached as JSON in ``$AUTOPAR_CACHE_DIR`` or ``~/.cache/autopar/``, one file per
host name, CPU count and torch version, and measured again once older than MAX_AGE_S (a
shared machine's speed drifts). ``python -m autopar.cost.probe`` prints this machine's
figures and their age (``--refresh`` measures again).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from . import link_probe
from .link_probe import LinkTiming, time_link

MATMUL_N = 2048            # large enough for BLAS to reach its steady rate; ~0.1 s on 2 cores
MATMUL_RUNS = 5
MATMUL_SIZES = (32, 64, 128, 256, 512, 1024)   # smaller square matmuls, for the curve
COPY_BYTES = 2**27         # 128 MiB, far beyond any last-level cache
COPY_RUNS = 5
COPY_SIZES = (2**14, 2**16, 2**18, 2**20, 2**22, 2**24)   # smaller copies, for the curve
CURVE_SECONDS = 0.02       # each point of a curve times at least this much work per run
MAX_AGE_S = 7 * 24 * 3600  # cached figures older than a week are measured again
MAX_LINK_RANKS = 16        # worlds up to this size get the link timed over their own count
OP_RUNS = 2000             # tiny ops timed for the per-op overhead
PROBE_PROCESSES = 2
NOMINAL_MEMORY_BYTES = 16e9   # when the OS will not say how much memory there is

# Set when the cache file's format changes, so that older files are measured again.
CACHE_VERSION = 6

measurements_taken = 0     # probes run by this process: tests check that the cache is used
link_probes_taken = 0      # worlds of probe processes started by this process


@dataclass(frozen=True)
class Measurement:
    """What the probe found on one machine (compute and memory for the whole machine)."""

    peak_flops: float
    memory_bandwidth_bytes_per_s: float
    memory_bytes: float
    num_threads: int
    op_overhead_s: float   # framework time per op (and its backward) beyond its arithmetic
    host: str
    cpu_count: int
    torch_version: str
    probe_s: float
    measured_at: float                      # time.time() when measured
    # ((FLOPs, share of peak_flops), ...) and ((bytes, share of the memory bandwidth), ...)
    matmul_curve: tuple = ()
    copy_curve: tuple = ()
    # what one thread sustains on the largest matmul and copy (a process of one thread
    # gets no more, whatever its share of the machine)
    thread_flops: float | None = None
    thread_copy_bytes_per_s: float | None = None
    # the link as worlds of local processes timed it (LinkTiming), the probe's own first;
    # none where it failed (a local world of more processes than cores computes and runs
    # its collectives slower than two processes do: each world size is timed once)
    links: tuple = ()
    source: str = "measured now"

    def link_for(self, ranks: int) -> LinkTiming | None:
        """The link as timed over ``ranks`` processes where it was, else over the probe's
        own; None where no link was timed."""
        return next((t for t in self.links if t.ranks == ranks),
                    self.links[0] if self.links else None)

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
        d["links"] = tuple(LinkTiming(**t) for t in d.get("links", ()))
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
        if m.links:  # a failed link probe is tried again next time
            save(m)
    if ranks is not None and m.links and m.link_for(ranks).ranks != ranks and \
            2 <= ranks <= MAX_LINK_RANKS:
        timing = _spawned_link(ranks)
        if timing is not None:
            m = dataclasses.replace(m, links=m.links + (timing,))
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
    if rank == 0 and box[0].links:
        save(box[0])
    dist.broadcast_object_list(box, src=0)
    return box[0]


def measure(link: LinkTiming | None = None) -> Measurement:
    """Measure now: compute and memory here, and the ``link`` given, or else timed by
    PROBE_PROCESSES processes started for it."""
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
        link = _spawned_link(PROBE_PROCESSES)
    return Measurement(peak_flops, memory_bandwidth, _memory_bytes(), threads, op_overhead,
                       socket.gethostname(), usable_cpus(), torch.__version__,
                       time.perf_counter() - start, time.time(), matmul_curve, copy_curve,
                       thread_flops, thread_copy, (link,) if link is not None else ())


def _spawned_link(ranks: int) -> LinkTiming | None:
    """The link timed by ``ranks`` processes started for it; None (with a warning) where
    that fails."""
    global link_probes_taken
    link_probes_taken += 1
    try:
        return link_probe.spawn(ranks)
    except (RuntimeError, OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"autopar: could not time gloo collectives between {ranks} local "
                      f"processes ({e}); planning with the figures known, nominal where none, "
                      "and not caching them", stacklevel=4)
        return None


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m autopar.cost.probe",
                                     description="Measure this machine for Cluster.local().")
    parser.add_argument("--refresh", action="store_true", help="measure again, ignoring the cache")
    parser.add_argument("--world-size", type=int, default=2, help="processes to describe")
    args = parser.parse_args(argv)
    if args.refresh:
        local_measurement(refresh=True)
    from autopar import Cluster
    print(Cluster.local(args.world_size).describe())


if __name__ == "__main__":
    main()
