import os
import sys

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # workers side by side on the cores: a thread each (torch's own would spin against them)
    torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every process of the suite, this one and the subprocesses it starts, imports torchvision
# whatever build pip chose for it (tests/site/sitecustomize.py says why)
SITE = os.path.join(ROOT, "tests", "site")
os.environ["PYTHONPATH"] = os.pathsep.join(
    [SITE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from vision_models import define_missing_torchvision_ops  # noqa: E402

define_missing_torchvision_ops()  # this process


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models, whose ops take microseconds: intra-op threads cost more
    than they save, and far more when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
