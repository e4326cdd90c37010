"""The plan report: one self-contained HTML page per plan with every layer of the plan,
memory bars whose parts add up to the predicted peak per device, and a pipeline's schedule
as played; then the same page rendered by a real browser (headless chromium), checked in
the DOM it builds and in a screenshot."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import pytest
import torch

import autopar
from autopar import Replicate, Shard
from autopar.search import stages as S
from autopar.program.graph import block_of
from autopar.search.report import memory_bars, schedule_timeline
from autopar.units import format_bytes
from models import GPT, GPTConfig, tiny_batch

# Megatron's split of the MLP pinned; the planner picks the rest (the batch split over dp)
PINS = {"h.*.mlp.c_fc.weight": (Replicate(), Shard(0)),
        "h.*.mlp.c_proj.weight": (Replicate(), Shard(1))}
KINDS = {"parameters", "gradients", "optimizer", "activations", "transient", "buckets",
         "other"}
WINDOW = (1400, 2000)
INSTALL = ("apt-get update && apt-get install -y --no-install-recommends chromium "
           "(Debian; .ci/run does this when run as root)")


def gpt_plan(layers, batch, seq, **options):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=layers)
    tokens, targets = tiny_batch(cfg, batch=batch, seq=seq)
    return autopar.plan(GPT(cfg), autopar.Cluster.local(4, measure=False),
                        example_inputs=(tokens, targets), **options)


@pytest.fixture(scope="module")
def plans():
    return {"tp": gpt_plan(2, 32, 16, mesh={"dp": 2, "tp": 2}, constraints=PINS),
            "pipeline": gpt_plan(4, 8, 8, mesh={"pp": 2, "dp": 2}, micro_batches=4,
                                 schedule="1f1b")}


class ReportDom(HTMLParser):
    """What a test reads of a report page: the layer rows, the memory bars and their parts,
    the schedule's actions, the tags and every address an attribute points to."""

    def __init__(self, text: str):
        super().__init__()
        self.layers, self.bars, self.actions, self.tags, self.addresses = [], [], [], set(), []
        self._bar = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.addresses += [v for k, v in attrs if k in ("src", "href", "xlink:href") and v]
        if tag == "tr" and "data-layer" in a:
            self.layers.append((a["data-layer"], a.get("data-stage")))
        elif tag == "g" and "data-peak-bytes" in a:
            self._bar = {"peak": float(a["data-peak-bytes"]), "stage": a.get("data-stage"),
                         "segments": []}
            self.bars.append(self._bar)
        elif tag == "rect" and "data-kind" in a and self._bar is not None:
            self._bar["segments"].append((a["data-kind"], float(a["data-bytes"])))
        elif tag == "g" and "action" in a.get("class", "").split():
            self.actions.append((int(a["data-stage"]), a["data-kind"], int(a["data-micro"]),
                                 float(a["data-start-s"]), float(a["data-end-s"])))

    def handle_endtag(self, tag):
        if tag == "g":
            self._bar = None


def expected_layers(plan) -> set:
    return {block_of(v["module"]) or "(top level)" for v in plan.nodes.values()} | \
        {block_of(fqn) or "(top level)" for fqn in plan.placements}


def expected_peaks(plan) -> dict:
    """Per memory bar (None: every device; else the stage), its predicted peak."""
    if not plan.stages:
        return {None: plan.cost.memory_bytes_per_device}
    return {str(st["stage"]): st["memory_bytes"] for st in plan.stages}


def check_page(dom: ReportDom, plan):
    """Every layer has its row, the memory bars add up to the predicted peaks, and the
    pipeline's schedule has every action."""
    assert {name for name, _ in dom.layers} == expected_layers(plan)
    for st in plan.stages:
        rows = {name for name, stage in dom.layers if stage == str(st["stage"])}
        assert set(st["layers"]) <= rows
    peaks = expected_peaks(plan)
    assert {bar["stage"] for bar in dom.bars} == set(peaks)
    for bar in dom.bars:
        want = peaks[bar["stage"]]
        assert bar["peak"] == pytest.approx(want, rel=1e-12)
        assert sum(b for _, b in bar["segments"]) == pytest.approx(want, rel=1e-6)
        assert {k for k, _ in bar["segments"]} <= KINDS
        assert {"parameters", "gradients", "optimizer"} <= {k for k, _ in bar["segments"]}
    if plan.stages:
        m, n = plan.micro_batches, len(plan.stages)
        assert sorted((s, k, mb) for s, k, mb, _, _ in dom.actions) == \
            sorted((s, k, mb) for s in range(n) for k in "FB" for mb in range(m))
        assert max(end for *_, end in dom.actions) <= plan.cost.total_s * (1 + 1e-9)
    else:
        assert not dom.actions


def check_offline(text: str, dom: ReportDom):
    """Nothing the page shows is fetched when it is viewed."""
    assert not re.search(r"https?://", text)
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:[a-z]+:)?//", text, re.IGNORECASE)
    assert "@import" not in text and "url(" not in text
    assert not dom.addresses
    assert not dom.tags & {"script", "link", "img", "iframe", "object", "embed"}


# -- the page as written -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tp", "pipeline"])
def test_a_report_shows_every_layer_and_memory_adding_up_to_the_peak(plans, name, tmp_path):
    plan = plans[name]
    path = plan.report(tmp_path / "plan.html")
    assert path == tmp_path / "plan.html"
    text = path.read_text(encoding="utf-8")
    dom = ReportDom(text)
    check_page(dom, plan)
    check_offline(text, dom)
    for line in plan.axis_summary()[1:]:   # what runs on each mesh axis, in words
        assert line.strip().partition(": ")[2] in text


def test_the_tensor_parallel_layers_say_what_each_split_means(plans, tmp_path):
    text = plans["tp"].report(tmp_path / "plan.html").read_text(encoding="utf-8")
    for words in ("column-parallel", "row-parallel", "replicated, batch split",
                  "pinned (use)"):
        assert words in text
    row = re.search(r'<tr class="layer" data-layer="h\.0".*?</tr>', text, re.DOTALL).group(0)
    assert "mlp.c_fc.weight" in row and "S(0)" in row


def test_a_tied_weight_shows_under_each_name_the_model_gives_it(plans, tmp_path):
    """GPT's head shares the embedding's weight: the plan names it wte.weight, and the
    head's row shows it too, said to be the same tensor."""
    plan = plans["tp"]
    assert plan.stats["aliases"] == {"wte.weight": ["lm_head.weight"]}
    text = plan.report(tmp_path / "plan.html").read_text(encoding="utf-8")
    row = re.search(r'<tr class="layer" data-layer="lm_head".*?</tr>', text, re.DOTALL).group(0)
    assert "weight (= wte.weight)" in row and "no parameters" not in row


def test_a_plan_without_stages_measures_its_peak_against_the_budget_it_was_planned_for(
        plans):
    plan = plans["tp"]
    budget = plan.stats["memory_budget_bytes"]
    assert budget == min(d.memory_bytes
                         for d in autopar.Cluster.local(4, measure=False).devices())
    [bar] = memory_bars(plan)
    assert bar.capacity_bytes == budget
    assert f"{format_bytes(plan.cost.memory_bytes_per_device)} of {format_bytes(budget)}" in \
        plan.explain()


def test_a_stage_memory_bar_adds_the_activations_of_the_micro_batches_it_holds(plans):
    plan = plans["pipeline"]
    bars = memory_bars(plan)
    assert [b.peak_bytes for b in bars] == [st["memory_bytes"] for st in plan.stages]
    for bar, st in zip(bars, plan.stages):
        own = st["cost"]["memory_bytes_per_device"]
        held = (st["micro_batches_held"] - 1) * st["cost"]["saved_bytes"]
        assert bar.peak_bytes == pytest.approx(own + held, rel=1e-12)
        assert bar.capacity_bytes == st["budget_bytes"]


def test_the_schedule_is_played_with_the_planned_stage_times(plans):
    plan = plans["pipeline"]
    tl = schedule_timeline(plan)
    assert tl.exact and tl.step_s == pytest.approx(plan.cost.total_s, rel=1e-12)
    p, m = len(plan.stages), plan.micro_batches
    for g, order in enumerate(S.schedule_orders("1f1b", p, 1, m)):
        mine = [sp for sp in tl.spans if sp.group == g]
        assert [sp.action for sp in sorted(mine, key=lambda sp: sp.start_s)] == order
        assert all(a.end_s <= b.start_s + 1e-15 for a, b in itertools.pairwise(mine))


def test_a_plan_with_only_stage_totals_plays_gpipe_from_them(plans, tmp_path):
    """Stage dicts of step time and memory alone: each micro-batch takes the step over the
    micro-batches (backward twice the forward), played in GPipe's order; each stage's memory
    is drawn whole."""
    plan = autopar.Plan.from_json(plans["pipeline"].to_json())
    plan.schedule = "gpipe"
    for st in plan.stages:
        for key in ("cost", "forward_s", "backward_s", "fixed_s", "transfer_s"):
            del st[key]
        st["time_s"] = 4e-3
    tl = schedule_timeline(plan)
    assert not tl.exact
    p, m = len(plan.stages), plan.micro_batches
    assert tl.step_s == pytest.approx((m + p - 1) * 1e-3)
    for g in range(p):
        kinds = [sp.action.kind for sp in sorted((sp for sp in tl.spans if sp.group == g),
                                                 key=lambda sp: sp.start_s)]
        assert kinds == ["F"] * m + ["B"] * m
    text = plan.report(tmp_path / "plan.html").read_text(encoding="utf-8")
    dom = ReportDom(text)
    assert [[k for k, _ in bar["segments"]] for bar in dom.bars] == [["total"]] * p
    assert [bar["peak"] for bar in dom.bars] == [st["memory_bytes"] for st in plan.stages]


# -- the page in a browser -----------------------------------------------------------------

def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: the plan report is checked in a headless "
                    f"browser. Install it with: {INSTALL}")
    return exe


def run_chromium(args: list, profile) -> str:
    """Headless chromium's standard output for ``args``, within 60 seconds."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium took over 60 s: {' '.join(cmd)}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{err[-2000:]}"
    return out


def png_pixels(path) -> tuple:
    """(width, height, the set of distinct pixels, the share of pixels unlike the top-left
    one) of an 8-bit RGB or RGBA PNG: with PIL where it is installed, else decoded here."""
    try:
        from PIL import Image
    except ImportError:
        return _decode_png(path.read_bytes())
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        data = list(rgb.getdata())
        w, h = rgb.size
    return w, h, set(data), sum(px != data[0] for px in data) / len(data)


def _decode_png(data: bytes) -> tuple:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", chunk[:10])
        elif kind == b"IDAT":
            idat.append(chunk)
        pos += 12 + n
    assert depth == 8 and color in (2, 6), f"PNG of depth {depth}, colour type {color}"
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(b"".join(idat)), w * bpp
    prev, pixels = bytearray(stride), []
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        pixels += [bytes(line[i:i + 3]) for i in range(0, stride, bpp)]
        prev = line
    return w, h, set(pixels), sum(px != pixels[0] for px in pixels) / len(pixels)


@pytest.mark.parametrize("name", ["tp", "pipeline"])
def test_a_browser_renders_the_report_with_every_layer_and_memory_bar(plans, name, tmp_path):
    plan = plans[name]
    page = plan.report(tmp_path / f"report-{name}.html")
    url = page.resolve().as_uri()
    shot = tmp_path / f"report-{name}.png"
    run_chromium([f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", url],
                 tmp_path / "profile-shot")
    print(f"screenshot of the {name} plan's report: {shot}")
    w, h, colours, inked = png_pixels(shot)
    assert (w, h) == WINDOW
    assert len(colours) >= 16 and inked > 0.02, "the screenshot is (nearly) one colour"
    dom = ReportDom(run_chromium(["--dump-dom", url], tmp_path / "profile-dom"))
    check_page(dom, plan)
