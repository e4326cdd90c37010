"""Plan torchvision's ResNet-50 for a DGX A100, then train a small ResNet as 4 local CPU
processes (gloo) and show it computes what one device computes, BatchNorm included.

The ResNet-50 is built on the meta device (shapes only, no memory) and planned for a step of
256 images of 224x224 with AdamW; the plan says how each convolution is split. The small
ResNet (torchvision's ResNet with one basic block per stage, 64 to 512 channels) trains on
32x32 images with the batch split over 4 processes: every BatchNorm normalizes by the whole
batch's statistics (a sum over the processes), and after every step each process holds the
running statistics one device holds.

    python examples/vision.py              # spawns the 4 processes itself
    torchrun --nproc_per_node 4 examples/vision.py
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autopar  # noqa: E402
from autopar import format_layout  # noqa: E402
from local_world import join, launch, train, under_torchrun  # noqa: E402
from vision_models import Classifier, torchvision_models  # noqa: E402

WORLD = 4
STEPS = 3


def plan_resnet50():
    models = torchvision_models()
    with torch.device("meta"):
        model = Classifier(models.resnet50())
    images = torch.empty(256, 3, 224, 224, device="meta")
    labels = torch.empty(256, dtype=torch.long, device="meta")
    start = time.perf_counter()
    plan = autopar.plan(model, autopar.Cluster.preset("dgx-a100"),
                        example_inputs=(images, labels))
    print(f"ResNet-50, 256 images of 224x224, AdamW, on one DGX A100 (8 x A100 80GB): planned "
          f"in {time.perf_counter() - start:.0f} s")
    for line in plan.axis_summary():
        print(line)
    convs = Counter(format_layout(n["inputs"][1]) for n in plan.nodes.values()
                    if n["op"] == "conv2d")
    print(f"mesh {plan.mesh}; its {sum(convs.values())} convolutions use their weight as "
          + ", ".join(f"{layout} ({count})" for layout, count in convs.most_common()))
    print(f"predicted step {plan.cost.total_s * 1e3:.0f} ms, peak memory per device "
          f"{plan.cost.memory_bytes_per_device / 2**30:.1f} GiB\n")


def small_resnet():
    models = torchvision_models()
    return models.ResNet(models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)


def sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.05)


def worker(rank: int, world: int, port: int):
    join(rank, world, port)                    # same weights and data on every rank
    model = Classifier(small_resnet())
    single = copy.deepcopy(model)
    batches = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(STEPS)]
    pm = autopar.compile(model, autopar.Cluster.local(), example_inputs=batches[0],
                         mesh={"dp": world}, constraints={"images": "S(0)", "labels": "S(0)"})
    losses = train(pm, batches, sgd)
    state = pm.full_state_dict()
    if rank == 0:
        reference = train(single, batches, sgd)
        report(losses, reference, state, single)
    dist.barrier()
    dist.destroy_process_group()


def report(losses, reference, state, single):
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    for step, (a, b) in enumerate(zip(losses, reference)):
        print(f"step {step}: loss one device {b:.6f}, {WORLD} processes {a:.6f}")
    stats = {k: v for k, v in single.state_dict().items() if "running" in k}
    stats_worst = max((state[k] - v).abs().max().item() / v.abs().max().item()
                      for k, v in stats.items())
    counters = all(int(state[k]) == STEPS for k in state if k.endswith("num_batches_tracked"))
    print(f"{len(stats)} running statistics, worst relative difference {stats_worst:.1e}; "
          f"every step counter at {STEPS}: {counters}")
    ok = worst <= 1e-5 and stats_worst <= 1e-5 and counters
    print(f"the distributed program {'matches' if ok else 'DIFFERS FROM'} one device (worst "
          f"loss difference {worst:.1e}; fp32 tolerance 1e-5)")
    if not ok:
        sys.exit(1)


def main():
    if not under_torchrun() or os.environ["RANK"] == "0":
        plan_resnet50()
    launch(worker, WORLD)


if __name__ == "__main__":
    main()
