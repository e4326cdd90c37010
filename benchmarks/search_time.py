"""How long autopar takes to plan LLaMA-3-shaped models for 8 nodes of 8 H100s, by phase.

Models are the LLaMA of examples/models.py on the meta device (no memory is allocated) with
the public LLaMA-3 shapes: 8B (32 layers, width 4096), 70B (80 layers, width 8192), 405B (126
layers, width 16384), and the 70B width at depths 8 to 128. One training step of 8 sequences
of 2048 tokens, bf16 with fp32 master weights and AdamW; 405B trains one sequence of 1024
tokens with SGD (its AdamW states alone would take 101 GB of each H100's 80, and its
weights, master weights and gradients take 63). Every candidate mesh of the 64 devices is
planned with the exact program (level "full").

Each row is planned folded (the default: two layers traced; the first and last layers and
one standing for those between planned). Where the depth is at most ``--unfolded-depth``,
the mesh the folded plan chose is planned again twice with the exact program however large
(no pruning of strategies): folded, and unfolded (every layer traced and planned on its
own); the gap is the folded optimum's step time minus the unfolded one's, relative
(0: folding lost nothing).

A second table plans the 70B at other steps (sequences x tokens, fp32 and bf16-mixed,
AdamW), memory binding at some and not at others, and prints what the planner chose: the
mesh, the recomputation per block and the micro-batches.

    python benchmarks/search_time.py                    # about two minutes on 2 cores
    python benchmarks/search_time.py --unfolded-depth 0 # folded only
    python benchmarks/search_time.py --steps ""         # without the second table
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings

import torch
from rich.console import Console
from rich.table import Table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import autopar  # noqa: E402
import autopar.search.meshes  # noqa: E402
from models import Llama, LlamaConfig  # noqa: E402

# The public LLaMA-3 shapes (Meta's model cards and the Llama 3 paper, table 3).
SHAPES = {
    "8B": dict(dim=4096, hidden_dim=14336, n_heads=32, n_kv_heads=8, n_layers=32),
    "70B": dict(dim=8192, hidden_dim=28672, n_heads=64, n_kv_heads=8, n_layers=80),
    "405B": dict(dim=16384, hidden_dim=53248, n_heads=128, n_kv_heads=8, n_layers=126),
}
VOCAB = 128256
BATCH, SEQ = 8, 2048
NODES = 8
# 70B training steps: (sequences, tokens each, precision)
STEPS = ((8, 2048, "bf16-mixed"), (16, 1024, "bf16-mixed"), (4, 4096, "bf16-mixed"),
         (4, 4096, "fp32"), (64, 4096, "bf16-mixed"), (64, 4096, "fp32"))
PHASES = ("capture", "normalize_graph", "annotate_shapes", "simplify_graph", "expand_repeats",
          "fold_repeated_blocks", "assign_layouts")


def rows(depths) -> list:
    out = [(name, dict(shape)) for name, shape in SHAPES.items()]
    for d in depths:
        out.append((f"70B width, {d} layers", dict(SHAPES["70B"], n_layers=d)))
    return out


def llama(shape: dict, batch: int, seq: int):
    with torch.device("meta"):
        model = Llama(LlamaConfig(vocab_size=VOCAB, max_seq_len=seq, **shape))
    tokens = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    return model, (tokens, tokens)


def plan(name, shape, cluster, batch=BATCH, seq=SEQ, precision="bf16-mixed", **options):
    big = name == "405B"
    model, example = llama(shape, *((1, SEQ // 2) if big else (batch, seq)))
    optimizer = "sgd" if big else "adamw"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = autopar.plan(model, cluster, example_inputs=example, precision=precision,
                         optimizer=optimizer, **options)
    return p, time.perf_counter() - start


def recompute_summary(p) -> str:
    """How many blocks take each recomputation choice: "full 20, selective 60"."""
    counts = {}
    for c in p.recompute.values():
        counts[c] = counts.get(c, 0) + 1
    return ", ".join(f"{c} {n}" for c, n in counts.items()) or "-"


def steps_table(cluster, steps) -> Table:
    table = Table(title=f"LLaMA-3 70B steps on {cluster}, AdamW, seconds")
    for col in ("step", "precision", "plan s", "mesh", "recompute", "micro-batches",
                "step s", "peak GiB"):
        table.add_column(col, justify="left" if col in ("step", "precision", "mesh",
                                                         "recompute") else "right")
    for batch, seq, precision in steps:
        gc.collect()
        p, total = plan("70B", SHAPES["70B"], cluster, batch, seq, precision)
        mesh = "x".join(f"{k}{v}" for k, v in p.mesh.items())
        table.add_row(f"{batch} x {seq}", precision, f"{total:.2f}", mesh,
                      recompute_summary(p), str(p.micro_batches), f"{p.cost.total_s:.3f}",
                      f"{p.cost.memory_bytes_per_device / 2**30:.1f}")
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unfolded-depth", type=int, default=16,
                        help="plan unfolded too where the model has at most this many layers")
    parser.add_argument("--depths", default="8,16,32,64,128",
                        help="depths of the 70B-width rows, comma-separated")
    parser.add_argument("--steps", default=",".join(str(i) for i in range(len(STEPS))),
                        help="which 70B steps of STEPS to plan, by index, comma-separated")
    args = parser.parse_args(argv)
    cluster = autopar.Cluster.preset("dgx-h100", nodes=NODES)
    console = Console(width=200)
    table = Table(title=f"planning time on this machine, {cluster} "
                        f"({torch.get_num_threads()} threads), seconds")
    for col in ("model", "layers", "nodes", "capture", "analysis", "plan (meshes)",
                "total", "mesh", "step s", "unfolded total", "gap"):
        table.add_column(col, justify="left" if col in ("model", "mesh") else "right")
    results = {}
    for name, shape in rows([int(d) for d in args.depths.split(",") if d]):
        gc.collect()  # what the rows before left (unfolded programs most), not timed
        p, total = plan(name, shape, cluster)
        sec = p.stats["seconds"]
        analysis = sum(sec.get(k, 0.0) for k in PHASES[1:-1])
        unfolded, gap = "-", "-"
        if shape["n_layers"] <= args.unfolded_depth:
            pruning, autopar.search.meshes.MAX_EXACT_PAIRS = autopar.search.meshes.MAX_EXACT_PAIRS, \
                float("inf")
            try:
                f, _ = plan(name, shape, cluster, mesh=p.mesh)
                q, q_total = plan(name, shape, cluster, fold=False, mesh=p.mesh)
            finally:
                autopar.search.meshes.MAX_EXACT_PAIRS = pruning
            unfolded = f"{q_total:.2f}"
            gap = f"{(f.cost.total_s - q.cost.total_s) / q.cost.total_s:+.1e}"
        results[name] = total
        mesh = "x".join(f"{k}{v}" for k, v in p.mesh.items())
        table.add_row(name, str(shape["n_layers"]), str(p.stats["nodes"]),
                      f"{sec['capture']:.2f}", f"{analysis:.2f}",
                      f"{sec.get('assign_layouts', 0.0) + sec.get('plan_stages', 0.0):.2f} "
                      f"({len(p.stats.get('meshes', ()))})",
                      f"{total:.2f}", mesh, f"{p.cost.total_s:.3f}", unfolded, gap)
        console.print(f"{name}: {total:.2f} s", style="dim")
    console.print(table)
    deep = [f"70B width, {d} layers" for d in args.depths.split(",") if d]
    if len(deep) >= 2 and deep[0] in results and deep[-1] in results:
        console.print(f"depth {deep[0].split(', ')[1]} -> {deep[-1].split(', ')[1]}: "
                      f"x{results[deep[-1]] / results[deep[0]]:.2f} the time")
    chosen = [STEPS[int(i)] for i in args.steps.split(",") if i]
    if chosen:
        console.print(steps_table(cluster, chosen))


if __name__ == "__main__":
    main()
