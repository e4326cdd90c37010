"""How well autopar's memory model predicts what a training step really holds per device.

Six models, four of them written here and two from transformers (small configs, random
weights): the GPT, LLaMA and BERT of examples/models.py; a stack of SwiGLU MLPs whose gate
and up projections are separate modules reading one input; a transformers Qwen2 decoder that
returns its logits beside the loss, with padded sequences and ignored labels; and a
transformers BERT encoder classifying padded sequences. Each is compiled for
``Cluster.local(n)`` on 2 and on 4 processes under forced plans (``mesh=``, ``constraints=``,
``storage=``, ``recompute=``, ``micro_batches=``, ``optimizer=``): data parallel with AdamW
and with SGD; sharded parameters; Megatron tensor parallel (on 4 processes, 2 x 2 with data
parallel); data parallel with full and with selective recomputation of every block; data
parallel over 4 micro-batches; sharded parameters with selective recomputation over 4
micro-batches and SGD; and the automatic plan.

Each plan trains for real on gloo processes (two warm-up steps, so that the optimizer's states
exist; gradients are zeroed in place, not freed, as the model counts them held). The third
step, ``pm.step(...)`` (forward and backward of every micro-batch), runs under
``autopar.runtime.memory.measure_step``: a dispatch mode that sees every op's outputs and
follows each storage until it is freed, starting from the parameters, their gradients and the
optimizer's states. It reports, per device (the largest over the ranks):

- held: parameters, gradients and optimizer states before the step, against
  ``cost.parameter_bytes + gradient_bytes + optimizer_bytes``;
- saved: what the step holds beyond them when the first backward starts (the activations
  saved for it and values still to be read), against ``cost.saved_bytes``;
- peak: the most alive at any point of the step, against ``cost.memory_bytes_per_device``.

    python benchmarks/memory_accuracy.py               # from the repository root, ~4 minutes
    python benchmarks/memory_accuracy.py --world 2     # one world size
    python benchmarks/memory_accuracy.py --models qwen2 bert-hf --plans automatic

The plans are priced with nominal local figures (``measure=False``): memory does not depend
on this machine's speed, and the plan of each forced configuration is then the same on any
machine. The goal is every plan's held, saved and peak bytes within 10% of the prediction.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import autopar
from autopar.runtime.memory import measure_step
from common import SEED, ResidualMLP, run_on_processes, short_error
from models import GPT, Bert, BertConfig, GPTConfig, Llama, LlamaConfig, tiny_batch

GOAL = 0.10
BATCH, SEQ, VOCAB = 16, 64, 512   # 4 micro-batches on 4 processes: one sequence each


# -- the models ------------------------------------------------------------------------------------

class SwiGLU(nn.Module):
    """A residual SwiGLU MLP: gate and up projections as separate modules, both reading the
    block's input."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


@dataclass(frozen=True)
class Model:
    """A model to build (seeded), its batch (positional or keyword), and Megatron tensor
    parallel as parameter glob -> the dim split."""

    name: str
    build: Callable[[], tuple]
    megatron: dict


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def _gpt():
    cfg = GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=4, n_embd=128)
    return GPT(cfg), tiny_batch(cfg, BATCH, SEQ)


def _llama():
    cfg = LlamaConfig(vocab_size=VOCAB, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                      hidden_dim=384, max_seq_len=SEQ)
    return Llama(cfg), tiny_batch(cfg, BATCH, SEQ)


def _bert():
    cfg = BertConfig(vocab_size=VOCAB, hidden=128, n_layers=2, n_heads=4, intermediate=512,
                     max_position=SEQ, n_labels=4)
    g = _generator()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[:, SEQ * 3 // 4:] = 0
    types = torch.zeros(BATCH, SEQ, dtype=torch.long)
    labels = torch.randint(0, cfg.n_labels, (BATCH,), generator=g)
    return Bert(cfg), (ids, mask, types, labels)


def _swiglu():
    g = _generator()
    rows = BATCH * 64
    return ResidualMLP(256, 768, 3, block=SwiGLU), (torch.randn(rows, 256, generator=g),
                                                    torch.randn(rows, 256, generator=g))


def _padded(ids: torch.Tensor) -> tuple:
    """An attention mask that pads the tail of every other sequence, and labels that ignore
    the padding."""
    mask = torch.ones_like(ids)
    mask[1::2, SEQ * 3 // 4:] = 0
    return mask, ids.masked_fill(mask == 0, -100)


def _qwen2():
    import transformers
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=384,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=SEQ,
                                   attn_implementation="sdpa")
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=_generator())
    mask, labels = _padded(ids)
    return transformers.Qwen2ForCausalLM(cfg), {"input_ids": ids, "attention_mask": mask,
                                                "labels": labels}


def _bert_hf():
    import transformers
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=512,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=4,
                                  attn_implementation="sdpa")
    g = _generator()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    mask, _ = _padded(ids)
    labels = torch.randint(0, 4, (BATCH,), generator=g)
    return transformers.BertForSequenceClassification(cfg), {
        "input_ids": ids, "attention_mask": mask, "labels": labels}


MODELS = [
    Model("gpt", _gpt, {"h.*.attn.c_attn.*": 0, "h.*.attn.c_proj.weight": 1,
                        "h.*.mlp.c_fc.*": 0, "h.*.mlp.c_proj.weight": 1}),
    Model("llama", _llama, {"layers.*.attention.w[qkv].weight": 0,
                            "layers.*.attention.wo.weight": 1,
                            "layers.*.feed_forward.w[13].weight": 0,
                            "layers.*.feed_forward.w2.weight": 1}),
    Model("bert", _bert, {"layers.*.attention.query.*": 0, "layers.*.attention.key.*": 0,
                          "layers.*.attention.value.*": 0,
                          "layers.*.attention.dense.weight": 1,
                          "layers.*.intermediate.*": 0, "layers.*.output.weight": 1}),
    Model("swiglu", _swiglu, {"blocks.*.gate.weight": 0, "blocks.*.up.weight": 0,
                              "blocks.*.down.weight": 1}),
    Model("qwen2", _qwen2, {"*.self_attn.[qkv]_proj.*": 0, "*.self_attn.o_proj.weight": 1,
                            "*.mlp.gate_proj.weight": 0, "*.mlp.up_proj.weight": 0,
                            "*.mlp.down_proj.weight": 1}),
    Model("bert-hf", _bert_hf, {"*.attention.self.*": 0, "*.attention.output.dense.weight": 1,
                                "*.intermediate.dense.*": 0, "*.layer.*.output.dense.weight": 1}),
]


def build(model: Model) -> tuple:
    """The model with the same weights on every rank, and its batch."""
    torch.manual_seed(SEED)
    return model.build()


def input_names(module: nn.Module, batch) -> list:
    if isinstance(batch, dict):
        return list(batch)
    return list(inspect.signature(module.forward).parameters)[:len(batch)]


# -- the plans -------------------------------------------------------------------------------------

def forced_plans(model: Model, module: nn.Module, batch, world: int) -> dict:
    """Plan name -> compile options for this model on ``world`` processes."""
    params = {fqn: p.shape for fqn, p in module.named_parameters()}
    inputs = input_names(module, batch)
    replicated = {fqn: "R" for fqn in params}
    # a transformers model reads its padding mask through indexing that needs it whole: the
    # planner places keyword inputs
    split_inputs = {} if isinstance(batch, dict) else {n: "S(0)" for n in inputs}
    dp = dict(mesh={"dp": world}, constraints={**replicated, **split_inputs})
    sharded = {fqn: "S(0)" if shape[0] % world == 0 else "R" for fqn, shape in params.items()}
    fsdp = dict(dp, storage=sharded)
    if world == 2:
        tp = dict(mesh={"tp": 2}, constraints={
            **replicated, **{g: f"S({d})" for g, d in model.megatron.items()}})
    else:
        tp = dict(mesh={"dp": world // 2, "tp": 2}, constraints={
            **{f: "RR" for f in params}, **{g: f"RS({d})" for g, d in model.megatron.items()},
            **{n: "S(0)R" for n in split_inputs}})
    return {
        "data parallel": dp,
        "dp, SGD": dict(dp, optimizer="sgd"),
        "sharded params": fsdp,
        "Megatron TP": tp,
        "dp, full recompute": dict(dp, recompute="full"),
        "dp, selective recompute": dict(dp, recompute="selective"),
        "dp, 4 micro-batches": dict(dp, micro_batches=4),
        "sharded, selective, 4 micro-batches, SGD": dict(fsdp, recompute="selective",
                                                         micro_batches=4, optimizer="sgd"),
        "automatic": {},
    }


# -- measuring (inside each process) ---------------------------------------------------------------

def _step(pm, batch):
    return pm.step(**batch) if isinstance(batch, dict) else pm.step(*batch)


def measure_plan(model: Model, name: str, options: dict, cluster) -> dict:
    row = {"model": model.name, "plan": name, "world": dist.get_world_size()}
    module, batch = build(model)
    try:
        pm = autopar.compile(module, cluster, example_inputs=batch, **options)
        sgd = options.get("optimizer") == "sgd"
        optimizer = (torch.optim.SGD(pm.parameters(), lr=1e-3) if sgd
                     else torch.optim.AdamW(pm.parameters(), lr=1e-4))
        for _ in range(2):
            _step(pm, batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        got = (measure_step(pm, optimizer, **batch) if isinstance(batch, dict)
               else measure_step(pm, optimizer, *batch))
        measured = torch.tensor([got.held, got.saved, got.peak], dtype=torch.float64)
    except Exception as e:  # noqa: BLE001 - a plan that fails is a table row
        dist.barrier()
        return {**row, "error": short_error(e)}
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    plan, cost = pm.plan, pm.plan.cost
    choices = sorted(set(plan.recompute.values()) - {"none"}) or ["none"]
    row.update(mesh=" x ".join(f"{k}={v}" for k, v in plan.mesh.items()),
               recompute="/".join(choices), micro_batches=plan.micro_batches,
               optimizer="SGD" if sgd else "AdamW",
               held=measured[0].item(), saved=measured[1].item(), peak=measured[2].item(),
               predicted_held=cost.parameter_bytes + cost.gradient_bytes + cost.optimizer_bytes,
               predicted_saved=cost.saved_bytes,
               predicted_peak=cost.memory_bytes_per_device)
    return row


def measure_all(model_names: list, plan_names: list | None) -> list:
    world = dist.get_world_size()
    cluster = autopar.Cluster.local(world, measure=False)
    torch.set_num_threads(1)
    rows = []
    for model in MODELS:
        if model.name not in model_names:
            continue
        module, batch = build(model)
        for name, options in forced_plans(model, module, batch, world).items():
            if plan_names is None or name in plan_names:
                rows.append(measure_plan(model, name, options, cluster))
    return rows


# -- reporting (in the parent) ---------------------------------------------------------------------

def mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def error(measured: float, predicted: float) -> float:
    return (predicted - measured) / max(measured, 1.0)


def pair(r, key) -> str:
    e = error(r[key], r[f"predicted_{key}"])
    colour = "green" if abs(e) <= GOAL else "red"
    return f"{mib(r[key])} / {mib(r['predicted_' + key])} [{colour}]({e:+.1%})[/]"


def results_table(rows) -> Table:
    table = Table(title="measured / predicted MiB per device (the largest over the ranks); "
                        "(predicted - measured) / measured")
    for col in ("model", "procs", "plan", "mesh", "recompute", "micro-\nbatches", "optimizer",
                "held: params,\ngrads, optimizer", "saved for backward\n(first micro-batch)",
                "peak of the step"):
        table.add_column(col, overflow="fold")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], str(r["world"]), r["plan"], "", "", "", "",
                          f"[red]{r['error']}", "", "")
            continue
        table.add_row(r["model"], str(r["world"]), r["plan"], r["mesh"], r["recompute"],
                      str(r["micro_batches"]), r["optimizer"],
                      pair(r, "held"), pair(r, "saved"), pair(r, "peak"))
    return table


def summary(rows) -> list:
    done = [r for r in rows if "error" not in r]
    models = len({r["model"] for r in done})
    lines = [f"plans measured: {len(done)} of {len(rows)}, over {models} models"]
    for key in ("held", "saved", "peak"):
        errors = [abs(error(r[key], r[f"predicted_{key}"])) for r in done]
        if errors:
            within = sum(e <= GOAL for e in errors)
            lines.append(f"{key}: worst error {max(errors):.1%}, mean {sum(errors) / len(errors):.1%}"
                         f"; within {GOAL:.0%} in {within} of {len(errors)} plans")
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4],
                        help="process counts to run on (default: 2 4)")
    parser.add_argument("--models", nargs="+", default=[m.name for m in MODELS],
                        choices=[m.name for m in MODELS], help="models to measure (default: all)")
    parser.add_argument("--plans", nargs="+", default=None,
                        help="plan names to measure (default: all), as the table names them")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    console = Console(width=220)
    rows = []
    for world in args.world:
        rows += run_on_processes(measure_all, args.models, args.plans, world=world)
    console.print(results_table(rows))
    for line in summary(rows):
        console.print(line)
    console.print(f"finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
