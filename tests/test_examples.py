"""Every example runs, and every ```python block of the docs runs in order (one namespace per
document)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "examples").glob("*.py")
                 if "__main__" in p.read_text())
DOCS = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.processes
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_runs(script):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "examples")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                    if p]))
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if script.name in ("quickstart.py", "hf_llama.py", "vision.py", "dtensor_loop.py"):
        assert "matches one device" in done.stdout
    if script.name == "vision.py":   # the ResNet-50 plan, and the running statistics checked
        assert "ResNet-50" in done.stdout and "every step counter at 3: True" in done.stdout
    if script.name == "quickstart.py":
        _check_quickstart_splits_work(done.stdout)
    if script.name == "hf_llama.py":
        assert "captured with dynamo" in done.stdout and "ops without a rule: none" in done.stdout


def _check_quickstart_splits_work(out: str):
    """The rank program printed holds weights split on tp and used as held (no gather),
    partial sums reduced over tp, and the batch split on dp; the plan says so in words."""
    held = re.findall(r"(\w+_weight) = self\.\w+  # RS\((\d)\)", out)
    assert {dim for _, dim in held} == {"0", "1"}, "no column- and row-split weights"
    for name, _ in held:
        assert re.search(rf"linear\(\w+, {name}\b", out), f"{name} is not used as held"
        assert f"all_gather({name}" not in out
    assert re.search(r"all_reduce\(\w+, 'tp'\)", out)
    assert "shard(tokens, 0, 'dp')" in out and "shard(targets, 0, 'dp')" in out
    assert "dp (2): data parallel" in out and "tp (2): tensor parallel" in out
    assert "column-parallel" in out and "row-parallel" in out


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_code_runs(doc, monkeypatch):
    blocks = python_blocks(doc)
    assert blocks, f"{doc.name} has no python example"
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    namespace = {"__name__": f"doc_{doc.stem}"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{doc.name}[block {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{doc.name} block {i} failed: {e}\n{block}") from e


def test_readme_python_example_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    namespace = {"__name__": "readme"}
    for block in python_blocks(ROOT / "README.md"):
        exec(compile(block, "README.md", "exec"), namespace)
