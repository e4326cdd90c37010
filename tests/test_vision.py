"""Image classifiers from torchvision and timm (examples/vision_models.py: tiny configs,
random weights), trained through a cross-entropy loss, planned automatically and run in
simulated mode on meshes (4,) and (2, 2): the loss, the logits, every gradient and the
parameters and buffers after an SGD and an AdamW step equal one device's, and every
convolution, linear layer, matmul and attention runs split.

ResNet-18 and -50 and MobileNetV3 (BatchNorm in training: statistics over the whole batch,
running statistics written back on every rank; bottlenecks, squeeze-and-excitation),
ConvNeXt (depthwise convolutions, channels-last layer norms, layer scale), ViT (torch's
fused multi-head attention, one op), Swin (shifted windows: roll, pad, an attention mask
built by indexed assignment, a relative position bias gathered by index) and timm's ViT and
ConvNeXt (1x1-convolution MLPs). The cluster has slow devices on fast links, so that
splitting every op's work pays.
"""

from __future__ import annotations

import math

import pytest
import torch

import autopar
import vision_models
from autopar import Replicate
from equivalence import check_training, twin
from test_e2e_simulated import slow_devices

MESHES = {"4": {"tp": 4}, "2x2": {"dp": 2, "tp": 2}}
# ops that carry a model's FLOPs: each must run split, none replicated
HEAVY = {"conv2d", "linear", "matmul", "scaled_dot_product_attention",
         "multi_head_attention_forward"}
# AdamW moves an entry by about lr * g / (|g| + eps): where a gradient is float noise around
# zero (a key bias: softmax ignores a shift shared by a row), eps = 1e-5 would move it by
# 100 times that noise, a fp32 rounding of a reordered sum; eps = 1e-2 keeps such entries
# near still, and AdamW's step of every other entry is compared as it is.
ADAMW = dict(lr=1e-3, weight_decay=0.01, eps=1e-2)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny ops, one thread


# Deep BatchNorm networks at initialization amplify rounding: one device's own fp32
# gradients of ResNet-18 on 32x32 images differ from its fp64 gradients by 3.5e-4, so any
# reordered sum differs by as much; these compare in fp64, where the program is exact.
FP64 = {"resnet18", "resnet50", "mobilenet_v3"}


def make(name):
    """The family's classifier (seeded) and its inputs: images and labels."""
    torch.manual_seed(0)
    model, images = vision_models.FAMILIES[name]()
    labels = torch.arange(images.shape[0]) % vision_models.CLASSES
    if name in FP64:
        model, images = model.double(), images.double()
    return vision_models.Classifier(model, logits=True), (images, labels)


def replicated_heavy_ops(plan) -> list:
    """Heavy ops whose every input and output is replicated: work not split at all."""
    return [name for name, n in plan.nodes.items() if n["op"] in HEAVY
            and all(isinstance(p, Replicate) for lay in (*n["inputs"], n["output"]) for p in lay)]


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("name", list(vision_models.FAMILIES))
def test_classifier_matches_one_device_with_every_heavy_op_split(name, mesh):
    model, inputs = make(name)
    ref = twin(model)
    axes = MESHES[mesh]
    # two axes: the propagation planner (level "fast"), as test_hf plans them, in less time
    pm = autopar.compile(model, slow_devices(math.prod(axes.values())), example_inputs=inputs,
                         simulate=True, mesh=axes, level="fast" if len(axes) > 1 else "full")
    assert pm.plan.stats["fallback_ops"] == []
    assert any(n["op"] in HEAVY for n in pm.plan.nodes.values())
    assert replicated_heavy_ops(pm.plan) == []
    worst = check_training(pm, ref, inputs, adamw=ADAMW)
    assert worst <= 1e-5


def _shifted_twice(x):
    """Python fx cannot trace (a branch on a size); registered with torch.fx.wrap below."""
    return torch.roll(x, 1, dims=1) * 2 if x.shape[1] > 1 else x


torch.fx.wrap("_shifted_twice")


class _Wrapped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return _shifted_twice(self.proj(x))


def test_functions_fx_leaves_opaque_are_traced_into():
    """A function registered with torch.fx.wrap (torchvision's Swin attention, stochastic
    depth) is one opaque call in fx's trace, with no rule; the capture goes to Dynamo,
    which traces into it, and every op has a rule."""
    found = autopar.examine(_Wrapped(), (torch.randn(4, 8),))
    assert found.capture_method == "dynamo"
    assert found.ok, str(found)
    assert {"linear", "roll", "mul"} <= set(found.op_counts)
