import os
import sys

if os.environ.get("PYTEST_XDIST_WORKER"):
    # workers side by side on the cores: a thread each (torch's own would spin against them)
    import torch
    torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

