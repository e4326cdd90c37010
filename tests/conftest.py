import os
import runpy
import sys

if os.environ.get("PYTEST_XDIST_WORKER"):
    # workers side by side on the cores: a thread each (torch's own would spin against them)
    import torch
    torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every process of the suite, this one and the subprocesses it starts, imports torchvision
# whatever build pip chose for it (tests/site/sitecustomize.py says why)
SITE = os.path.join(ROOT, "tests", "site")
os.environ["PYTHONPATH"] = os.pathsep.join(
    [SITE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
if not getattr(sys.modules.get("sitecustomize"), "__file__", "").startswith(SITE):
    _SITE_GLOBALS = runpy.run_path(os.path.join(SITE, "sitecustomize.py"))  # this process
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

