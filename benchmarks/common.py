"""What the runtime benchmarks share: the models they train, running work on local gloo
processes, and timing a training step.

Not a benchmark itself; ``cost_model_accuracy.py`` and ``runtime_vs_torch.py`` import it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

from autopar import format_layout  # noqa: E402
from models import GPT, GPTConfig, Llama, LlamaConfig, tiny_batch  # noqa: E402

WORLD = 2
SEED = 0
PROCESS_GROUP_TIMEOUT_S = 300


# -- models ----------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class ResidualMLP(nn.Module):
    """Wide residual MLP blocks (``block(dim, hidden)`` each) and a mean squared error: a
    training step returns a scalar."""

    def __init__(self, dim: int, hidden: int, blocks: int, block=ResidualBlock):
        super().__init__()
        self.blocks = nn.ModuleList(block(dim, hidden) for _ in range(blocks))

    def forward(self, x, y):
        for block in self.blocks:
            x = block(x)
        # written out rather than F.mse_loss, which has no sharding rule and would run replicated
        return ((x - y) ** 2).mean()


@dataclass(frozen=True)
class Workload:
    """A model, its global batch, and how a hand-written parallel version splits it."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[], tuple]
    # Megatron column/row parallel as autopar constraints: parameter glob -> split dim.
    megatron: dict
    # The MLP layers for torch's parallelize_module: module glob -> "colwise" / "rowwise".
    mlp_layers: dict
    # Modules that FSDP2 shards one by one (then the root); attribute path of a ModuleList.
    blocks_attr: str


MLP_DIM, MLP_HIDDEN, MLP_BLOCKS, MLP_BATCH = 768, 3072, 2, 64
GPT_CONFIG = GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=256)
LLAMA_CONFIG = LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                           hidden_dim=768, max_seq_len=128)
LM_BATCH, LM_SEQ = 4, 128


def _mlp_batch():
    g = torch.Generator().manual_seed(SEED)
    return (torch.randn(MLP_BATCH, MLP_DIM, generator=g),
            torch.randn(MLP_BATCH, MLP_DIM, generator=g))


WORKLOADS = [
    # wide layers, a small batch: weights outweigh activations, so tensor parallel should win
    Workload(f"mlp {MLP_BLOCKS}x{MLP_DIM}x{MLP_HIDDEN}, batch {MLP_BATCH}",
             lambda: ResidualMLP(MLP_DIM, MLP_HIDDEN, MLP_BLOCKS), _mlp_batch,
             megatron={"blocks.*.fc1.*": 0, "blocks.*.fc2.weight": 1},
             mlp_layers={"blocks.*.fc1": "colwise", "blocks.*.fc2": "rowwise"},
             blocks_attr="blocks"),
    # many tokens per weight: data parallel (or sharded parameters) should win
    Workload(f"gpt {GPT_CONFIG.n_layer}x{GPT_CONFIG.n_embd}, {LM_BATCH}x{LM_SEQ} tokens",
             lambda: GPT(GPT_CONFIG), lambda: tiny_batch(GPT_CONFIG, LM_BATCH, LM_SEQ),
             megatron={"h.*.attn.c_attn.*": 0, "h.*.attn.c_proj.weight": 1,
                       "h.*.mlp.c_fc.*": 0, "h.*.mlp.c_proj.weight": 1},
             mlp_layers={"h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"},
             blocks_attr="h"),
    Workload(f"llama {LLAMA_CONFIG.n_layers}x{LLAMA_CONFIG.dim}, {LM_BATCH}x{LM_SEQ} tokens",
             lambda: Llama(LLAMA_CONFIG), lambda: tiny_batch(LLAMA_CONFIG, LM_BATCH, LM_SEQ),
             megatron={"layers.*.attention.w[qkv].weight": 0, "layers.*.attention.wo.weight": 1,
                       "layers.*.feed_forward.w[13].weight": 0,
                       "layers.*.feed_forward.w2.weight": 1},
             mlp_layers={"layers.*.feed_forward.w1": "colwise",
                         "layers.*.feed_forward.w3": "colwise",
                         "layers.*.feed_forward.w2": "rowwise"},
             blocks_attr="layers"),
]


def build(workload: Workload) -> nn.Module:
    """The model with the same weights on every rank."""
    torch.manual_seed(SEED)
    return workload.build()


# -- describing autopar's plans --------------------------------------------------------------------

def collectives(code: str) -> str:
    """The collectives a rank program calls (forward; backward mirrors them), counted."""
    calls = Counter(re.findall(r"autopar_runtime_collectives_(\w+)\(", code))
    return ", ".join(f"{name} {n}" for name, n in sorted(calls.items())) or "none"


def layouts(plan) -> str:
    """Parameter storage at a glance: how many parameters take each layout, and the inputs'."""
    counts = Counter(format_layout(v) for v in plan.placements.values())
    params = " ".join(f"{n}x{lay}" for lay, n in sorted(counts.items()))
    inputs = " ".join(format_layout(v) for v in plan.inputs.values())
    return f"params {params}; inputs {inputs}"


# -- the cluster -----------------------------------------------------------------------------------

@contextlib.contextmanager
def fresh_local_figures(enabled: bool = True):
    """Within it, ``Cluster.local()`` measures this machine now (a few seconds) instead of
    reading the figures cached by an earlier run: on a shared virtual machine the sustained
    FLOP/s can halve from one run to the next. The fresh figures go to a temporary cache,
    which the spawned processes inherit, and the user's cache is left alone."""
    if not enabled:
        yield
        return
    saved = os.environ.get("AUTOPAR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="autopar-bench-") as tmp:
        os.environ["AUTOPAR_CACHE_DIR"] = tmp
        try:
            yield
        finally:
            if saved is None:
                del os.environ["AUTOPAR_CACHE_DIR"]
            else:
                os.environ["AUTOPAR_CACHE_DIR"] = saved


def cached_figures() -> str | None:
    """The figures an earlier ``Cluster.local()`` cached for this machine, in one line."""
    from autopar.cost.probe import load_cached
    m = load_cached()
    if m is None:
        return None
    link = m.link_for(2)
    return (f"matmul {m.peak_flops / 1e9:.0f} GFLOP/s, copy "
            f"{m.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s" +
            ("" if link is None else f", all-reduce {link.bandwidth_bytes_per_s / 1e9:.2f} "
                                     f"GB/s, {link.latency_s * 1e6:.0f} us"))


# -- processes -------------------------------------------------------------------------------------

def run_on_processes(fn: Callable, *args, world: int = WORLD):
    """Run ``fn(*args)`` on ``world`` local processes joined by a gloo process group (spawned
    once: every case runs inside them); return what rank 0's call returned (JSON-able)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_process, args=(world, port, tmp, fn, args), nprocs=world,
                           start_method="spawn")
        with open(os.path.join(tmp, "result.json")) as f:
            return json.load(f)


def _process(rank: int, world: int, port: int, tmp: str, fn: Callable, args: tuple):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    # one core per process: the two processes share this machine's cores
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        if rank == 0:
            with open(os.path.join(tmp, "result.json"), "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


# -- timing ----------------------------------------------------------------------------------------

def train_step(model: nn.Module, optimizer, batch: tuple) -> torch.Tensor:
    """Forward, backward, optimizer step; returns the loss (this rank's)."""
    loss = model(*batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def step_module(pm, optimizer, batch) -> torch.Tensor:
    """A training step of a ParallelModule: ``pm.step`` on the batch (a tuple of positional
    inputs or a dict of keyword ones), then the optimizer step; returns the loss."""
    loss = pm.step(**batch) if isinstance(batch, dict) else pm.step(*batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def time_steps(step: Callable[[], object], repeat: int) -> list:
    """Seconds of ``repeat`` calls of ``step``, each between barriers so that no rank starts
    early, as the slowest rank saw it."""
    times = []
    for _ in range(repeat):
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.tolist()


def interleaved_times(steps: dict, rounds: int, per_round: int) -> dict:
    """Name -> seconds of each timed step of each step function in ``steps``, timed in turns
    (``per_round`` steps of each, ``rounds`` times over) so that drift in the machine's speed
    (a shared virtual machine's cores come and go) falls on all of them alike."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name] += time_steps(step, per_round)
    return times


_NOT_COMMUNICATION = {"wait_tensor", "_wrap_tensor_autograd"}  # bookkeeping, no message


def collective_calls(step: Callable[[], object]) -> int:
    """How many collectives one call of ``step`` issues on this rank, forward and backward:
    the ``_c10d_functional`` ops (what autopar's rank programs call) the dispatcher sees."""
    # TorchDispatchMode lives in a private module; checked with torch 2.13. A
    # TorchFunctionMode (public) would miss the backward pass, which autograd runs below it.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "_c10d_functional" and func._opname not in _NOT_COMMUNICATION:
                self.calls += 1
            return func(*args, **(kwargs or {}))

    with Count() as count:
        step()
    return count.calls


def sustained_rates(matmul_n: int = 1024, copy_bytes: int = 2**26, runs: int = 15) -> dict:
    """This process's median matmul FLOP/s and copy bytes/s while every rank runs the same
    loop at once: what a rank sustains during a step, to set beside Cluster.local's share."""
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    src = torch.ones(copy_bytes // 4)
    dst = torch.empty_like(src)
    dist.barrier()
    matmul_s = statistics.median(_timed(lambda: torch.mm(a, b)) for _ in range(runs))
    copy_s = statistics.median(_timed(lambda: dst.copy_(src)) for _ in range(runs))
    rates = torch.tensor([2 * matmul_n**3 / matmul_s, 2 * copy_bytes / copy_s],
                         dtype=torch.float64)
    dist.all_reduce(rates, op=dist.ReduceOp.MIN)
    return {"flops": rates[0].item(), "copy_bytes_per_s": rates[1].item()}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def barrier_s(repeat: int = 50) -> float:
    """Median seconds of one gloo barrier: what each timed step carries beyond its work."""
    return statistics.median(time_steps(lambda: None, repeat))


def relative_error(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def short_error(e: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_args(argv, doc: str, worlds: tuple = ()):
    """The benchmarks' options: plan with cached figures instead of measuring afresh; with
    ``worlds`` (the default world sizes), which world sizes to run."""
    import argparse
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--cached", action="store_true",
                        help="plan with the figures Cluster.local() cached earlier instead of "
                             "measuring this machine afresh")
    if worlds:
        parser.add_argument("--worlds", type=int, nargs="+", default=list(worlds),
                            help=f"numbers of gloo processes to run on (default: {worlds})")
    return parser.parse_args(argv)


def time_rows(rows: dict, steps: dict, rounds: int, per_round: int) -> list:
    """Time ``steps`` (name -> step function) taking turns, and add the median, fastest and
    slowest step seconds to each name's row."""
    for name, times in interleaved_times(steps, rounds, per_round).items():
        rows[name].update(measured_s=statistics.median(times), fastest_s=min(times),
                          slowest_s=max(times))
    return list(rows.values())


def run_planned_here(console, fn, cached: bool, world: int = WORLD, *args):
    """Run ``fn(*args)`` on ``world`` processes with Cluster.local() figures measured
    afresh (or, with ``cached``, those cached earlier), after printing them."""
    import autopar
    before = cached_figures()
    with fresh_local_figures(enabled=not cached):
        console.print(autopar.Cluster.local(world).describe())
        if before is not None and not cached:
            console.print(f"  (cached by an earlier run, not used: {before})")
        return run_on_processes(fn, *args, world=world)
