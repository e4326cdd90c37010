"""Run at start-up by every Python process of the test suite (tests/conftest.py puts this
folder first on PYTHONPATH, so the gloo workers and the examples run as subprocesses get it):
torchvision imports whatever build pip chose for it. PyPI's torchvision wheel is a CUDA
build, whose compiled ops fail to load beside torch's CPU build, and transformers and timm
import torchvision where it is installed (examples/vision_models.py says what is missing)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "examples"))

from vision_models import define_missing_torchvision_ops  # noqa: E402

define_missing_torchvision_ops()
