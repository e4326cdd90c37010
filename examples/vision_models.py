"""Small image classifiers from torchvision and timm, built from tiny configs with random
weights (nothing is downloaded): ResNet-18, ResNet-50, MobileNetV3, ConvNeXt, ViT and Swin
from torchvision, ViT and ConvNeXt from timm. Each builder returns ``(model, images)``: a
model in training mode whose forward takes a batch of images and returns logits, and a
seeded batch of 4 images.

    >>> model, images = vit()
    >>> tuple(model(images).shape)
    (4, 10)
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os

import torch

BATCH, CLASSES = 4, 10

# The schemas of torchvision's compiled operators that ``import torchvision`` needs even
# where the compiled library did not load (see torchvision_models); held here for as long as
# the process runs, since a Library's definitions go when the object is collected.
_TORCHVISION_SCHEMAS = None


def _compiled_ops_load() -> bool:
    """Whether torchvision's compiled ``_C`` library, found beside its package, loads."""
    spec = importlib.util.find_spec("torchvision")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "_C" + suffix)
            if os.path.exists(path):
                try:
                    torch.ops.load_library(path)
                    return True
                except OSError:
                    return False
    return False


def define_missing_torchvision_ops():
    """Where torchvision's compiled library does not load beside this torch, define the two
    operator schemas that ``torchvision/_meta_registrations.py`` registers fakes for without
    checking that the library loaded (``nms`` and ``qnms``)."""
    global _TORCHVISION_SCHEMAS
    if hasattr(torch.ops.torchvision, "nms") or importlib.util.find_spec("torchvision") is None \
            or _compiled_ops_load():
        return  # loaded or defined already (by a sitecustomize, say), or no torchvision
    lib = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SCHEMAS = lib


def torchvision_models():
    """``torchvision.models``, importable whether or not torchvision's compiled ops load.

    A torchvision wheel built for another torch (a CUDA build beside a CPU torch) fails to
    load its compiled ``_C`` library; torchvision catches that and runs without its custom
    ops, but ``import torchvision`` still registers fake implementations of
    ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, and fails with "operator
    torchvision::nms does not exist". Only where loading ``_C`` fails, the two schemas are
    defined first (the ops stay unusable, as torchvision intends without its library); the
    classifiers here use none of torchvision's custom ops. timm imports torchvision too, so
    call this before importing timm.
    """
    define_missing_torchvision_ops()
    import torchvision.models

    return torchvision.models


class Classifier(torch.nn.Module):
    """A classifier trained on labelled images: the mean cross-entropy of ``model``'s logits
    (with ``logits``, the logits too)."""

    def __init__(self, model: torch.nn.Module, logits: bool = False):
        super().__init__()
        self.model, self.logits = model, logits

    def forward(self, images, labels):
        out = self.model(images)
        loss = torch.nn.functional.cross_entropy(out, labels)
        return (loss, out) if self.logits else loss


def _images(size: int = 32) -> torch.Tensor:
    return torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))


def resnet18():
    """torchvision's ResNet-18 (BatchNorm after every convolution), 10 classes."""
    return torchvision_models().resnet18(num_classes=CLASSES), _images()


def resnet50():
    """torchvision's ResNet-50 (bottleneck blocks, 3, 4, 6 and 3 of them), a quarter as wide
    in its 3x3 convolutions (``width_per_group`` 16), 10 classes."""
    models = torchvision_models()
    model = models.ResNet(models.resnet.Bottleneck, [3, 4, 6, 3], num_classes=CLASSES,
                          width_per_group=16)
    return model, _images()


def mobilenet_v3():
    """torchvision's MobileNetV3-Small (depthwise convolutions, squeeze-and-excitation with
    an adaptive pool, hardswish), no dropout before the classifier."""
    return torchvision_models().mobilenet_v3_small(num_classes=CLASSES, dropout=0.0), _images()


def convnext():
    """torchvision's ConvNeXt, two stages (16 and 32 channels, one block each). The layer
    scale starts at 1, not 1e-6, so that every block's branch counts in the outputs and
    gradients compared."""
    models = torchvision_models()
    cfg = models.convnext.CNBlockConfig
    model = models.convnext.ConvNeXt([cfg(16, 32, 1), cfg(32, None, 1)], layer_scale=1.0,
                                     num_classes=CLASSES)
    return model, _images()


def vit():
    """torchvision's VisionTransformer: 32x32 images in 8x8 patches, 2 layers of 2 heads,
    width 32, MLP 64. Its classifier starts random: torchvision starts it at zero, which
    leaves every gradient but the classifier's zero at the first step."""
    models = torchvision_models()
    model = models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                     hidden_dim=32, mlp_dim=64, num_classes=CLASSES)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model, _images()


def swin():
    """torchvision's Swin Transformer: 4x4 patches, two stages (16 then 32 channels, 2 and 4
    heads, 2 blocks each) with 4x4 windows, shifted in every second block of the first
    stage (8x8 tokens); no stochastic depth."""
    models = torchvision_models()
    model = models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2],
                                   num_heads=[2, 4], window_size=[4, 4],
                                   stochastic_depth_prob=0.0, num_classes=CLASSES)
    return model, _images()


def _timm():
    torchvision_models()
    import timm

    return timm


def timm_vit():
    """timm's ViT: 32x32 images in 8x8 patches, 2 layers of 2 heads, width 32, MLP 64."""
    model = _timm().create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                 patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                 mlp_ratio=2.0, num_classes=CLASSES)
    return model, _images()


def timm_convnext():
    """timm's ConvNeXt-Atto (its MLPs 1x1 convolutions), four stages of one block each (16,
    16, 32 and 32 channels), layer scale 1 (see :func:`convnext`)."""
    model = _timm().create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1),
                                 dims=(16, 16, 32, 32), ls_init_value=1.0,
                                 num_classes=CLASSES)
    return model, _images()


FAMILIES = {"resnet18": resnet18, "resnet50": resnet50, "mobilenet_v3": mobilenet_v3,
            "convnext": convnext, "vit": vit, "swin": swin, "timm_vit": timm_vit,
            "timm_convnext": timm_convnext}


# -- Alpa's Wide-ResNet ------------------------------------------------------------------------

# Alpa's benchmark configurations (benchmark/alpa/suite_wresnet.py): name -> (layers, base
# channels, width factor), on 224x224 images, 1024 classes; planned on 8 to 64 GPUs
WIDE_RESNETS = {"250M": (50, 160, 2), "500M": (50, 224, 2), "1B": (50, 320, 2),
                "2B": (50, 448, 2), "4B": (50, 640, 2), "6.8B": (50, 320, 16),
                "13B": (101, 320, 16)}


class _WideBottleneck(torch.nn.Module):
    """1x1 to ``filters``, 3x3 (strided) to ``filters * width``, 1x1 to ``filters * 4``, each
    with BatchNorm; a projection where the shape changes."""

    def __init__(self, c_in: int, filters: int, width: int, stride: int):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(c_in, filters, 1, bias=False), nn.BatchNorm2d(filters)
        self.conv2 = nn.Conv2d(filters, filters * width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(filters * width)
        self.conv3 = nn.Conv2d(filters * width, filters * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(filters * 4)
        self.proj = None
        if stride != 1 or c_in != filters * 4:
            self.proj = nn.Sequential(nn.Conv2d(c_in, filters * 4, 1, stride, bias=False),
                                      nn.BatchNorm2d(filters * 4))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.proj is None else self.proj(x)))


class WideResNet(torch.nn.Module):
    """The Wide-ResNet of Alpa's benchmarks: a 7x7 stem, a 3x3 max pool, then bottleneck
    stages of ``channels * 2**i`` filters whose 3x3 convolutions are ``width`` times wider,
    the mean over the image, and a linear classifier."""

    def __init__(self, layers: int = 50, channels: int = 320, width: int = 2,
                 classes: int = 1024):
        super().__init__()
        nn = torch.nn
        stages = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[layers]
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 7, 2, 3, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, c_in = [], channels
        for i, count in enumerate(stages):
            for j in range(count):
                filters = channels * 2 ** i
                blocks.append(_WideBottleneck(c_in, filters, width, 2 if i and not j else 1))
                c_in = filters * 4
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, classes)

    def forward(self, images):
        return self.head(self.blocks(self.stem(images)).mean((2, 3)))


def wide_resnet(name: str, device="meta") -> WideResNet:
    """One of Alpa's Wide-ResNets (:data:`WIDE_RESNETS`), by default on the meta device
    (shapes only: planned without memory)."""
    layers, channels, width = WIDE_RESNETS[name]
    with torch.device(device):
        return WideResNet(layers, channels, width)
