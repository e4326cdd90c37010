"""Plan a small LLaMA from Hugging Face transformers for 4 GPUs, then run all 4 ranks here.

The model is built from a config with random weights (nothing is downloaded) and called as
transformers models are: keyword inputs, labels for the loss, a ModelOutput back; autopar
captures it with Dynamo. The plan is for 4 A100s of a DGX node on a {"dp": 2, "tp": 2} mesh,
with the attention and MLP projections pinned Megatron-style on "tp" by FQN globs and
everything else left to the planner. The script prints the plan, then runs the 4 ranks
simulated in this process on the CPU for three SGD steps and checks the loss against one
device.

    python examples/hf_llama.py
"""

from __future__ import annotations

import copy

import torch
import transformers

import autopar
from autopar import Replicate, Shard

MESH = {"dp": 2, "tp": 2}
COLUMN, ROW = (Replicate(), Shard(0)), (Replicate(), Shard(1))  # nn.Linear weight: (out, in)
TENSOR_PARALLEL = {
    "model.layers.*.self_attn.[qkv]_proj.weight": COLUMN,
    "model.layers.*.self_attn.o_proj.weight": ROW,
    "model.layers.*.mlp.gate_proj.weight": COLUMN,
    "model.layers.*.mlp.up_proj.weight": COLUMN,
    "model.layers.*.mlp.down_proj.weight": ROW,
}
STEPS = 3


def train(model, batch):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408,
                                      num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=4, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    single = copy.deepcopy(model)
    ids = torch.randint(0, config.vocab_size, (8, 64))
    batch = {"input_ids": ids, "labels": ids}

    cluster = autopar.Cluster.preset("dgx-a100", devices_per_node=4)
    pm = autopar.compile(model, cluster, example_inputs=batch, simulate=True, mesh=MESH,
                         constraints=TENSOR_PARALLEL)
    print(pm.plan.explain())
    layer = [row for row in pm.plan.explain(per="op").splitlines()
             if any(op in row for op in ("│ linear ", "scaled_dot_product_attention"))]
    print("the first layer's matmuls and attention (node, op, input layouts, output layout):")
    print("\n".join(layer[:8]))
    print(f"captured with {pm.plan.stats['capture_method']}: {pm.plan.stats['nodes']} nodes; "
          f"ops without a rule: {', '.join(pm.plan.stats['fallback_ops']) or 'none'}")

    losses, reference = train(pm, batch), train(single, batch)
    for step, (a, b) in enumerate(zip(losses, reference)):
        print(f"step {step}: loss {a:.6f} on 4 simulated ranks, {b:.6f} on one device")
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    verdict = "matches" if worst <= 1e-5 else "DIFFERS FROM"
    print(f"the distributed program {verdict} one device (worst relative difference "
          f"{worst:.1e}; fp32 tolerance 1e-5)")
    if worst > 1e-5:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
