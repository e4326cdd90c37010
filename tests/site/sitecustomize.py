"""Run at start-up by every Python process of the test suite (tests/conftest.py puts this
folder first on PYTHONPATH, so the gloo workers and the examples run as subprocesses get it).

PyPI's torchvision wheel is a CUDA build: beside torch's CPU build its compiled ops fail to
load, and ``import torchvision`` then stops at the fake kernels it registers for
``torchvision::nms`` and ``torchvision::qnms`` without checking (transformers imports
torchvision where it is installed, so that breaks transformers too). Where the compiled ops do
not load, their two schemas are defined here so the import goes through; torchvision's models
need none of its compiled ops."""

import importlib.util
import os


def _define_missing_torchvision_ops():
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = spec.submodule_search_locations[0]
    library = next((os.path.join(folder, f) for f in os.listdir(folder)
                    if f.startswith("_C") and f.endswith((".so", ".pyd"))), None)
    import torch
    try:
        if library is not None:
            torch.ops.load_library(library)
            return None
    except OSError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return lib


_TORCHVISION_OPS = _define_missing_torchvision_ops()
