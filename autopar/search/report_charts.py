"""The drawings of the plan report (:mod:`autopar.search.report`): the device mesh, memory
bars, time per layer and the pipeline timeline, each an inline SVG string, and the page's
stylesheet. Every mark has a ``<title>`` its tooltip shows."""

from __future__ import annotations

import math
from html import escape

from ..units import format_bytes, format_seconds

COMPUTE, COMMUNICATION = "#4e79a7", "#f28e2b"
MEMORY_KINDS = {   # kind -> (words, colour)
    "parameters": ("parameters", "#4e79a7"),
    "gradients": ("gradients", "#76b7b2"),
    "optimizer": ("optimizer states", "#59a14f"),
    "activations": ("activations", "#edc948"),
    "transient": ("transient", "#b07aa1"),
    "buckets": ("gradient-sum buckets", "#9c755f"),
    "other": ("other", "#bab0ac"),
    "total": ("total (parts not recorded)", "#8c8c8c"),
}
SERIES = {"compute": ("compute", COMPUTE), "communication": ("communication", COMMUNICATION),
          "forward": ("forward", "#a0cbe8"), "backward": ("backward", "#4e79a7"),
          "forward-later": ("forward, a later chunk", "#9fd6cf"),
          "backward-later": ("backward, a later chunk", "#3b8a84"),
          "fixed": ("gradient sums and optimizer", "#c9c9c9")}
CAPACITY = "#e15759"
INK, MUTED, LINE = "#1f2328", "#656d76", "#d0d7de"
# Meshes of more devices than this are described, not drawn.
MAX_DRAWN = 512
WIDTH = 1240

CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: #1f2328;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 28px 36px 64px; }
h1 { font-size: 24px; margin: 0 0 2px; letter-spacing: -0.01em; }
h2 { font-size: 17px; margin: 34px 0 8px; padding-bottom: 6px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 14px; margin: 20px 0 4px; }
.sub, .muted, .note { color: #656d76; }
.note { margin: 4px 0 10px; max-width: 980px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 16px 0 8px; }
.card { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 8px;
  padding: 10px 16px; min-width: 210px; }
.card .k { font-size: 11px; color: #656d76; text-transform: uppercase; letter-spacing: .05em; }
.card .v { font-size: 22px; font-weight: 600; margin: 2px 0; }
.card .d { font-size: 12px; color: #656d76; margin-bottom: 4px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono",
  monospace; font-size: 12px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid #e4e8ec;
  vertical-align: top; }
th { font-size: 12px; color: #656d76; font-weight: 600; border-bottom: 1px solid #d0d7de; }
.num { text-align: right; white-space: nowrap; }
tr.layer:hover { background: #f6f8fa; }
td.lname { white-space: nowrap; }
td.lname code { font-size: 13px; font-weight: 600; }
td.tcell { white-space: nowrap; width: 170px; }
td.work { min-width: 250px; }
ul.axes { margin: 6px 0; padding-left: 20px; }
ul.axes li { margin: 3px 0; }
.axis { display: inline-block; min-width: 26px; font-weight: 600; color: #1f2328; }
.pgroup { margin: 0 0 6px; }
.pnames code { color: #1f2328; }
.chip { display: inline-block; margin: 2px 6px 0 0; padding: 1px 8px; border-radius: 10px;
  font-size: 12px; background: #eef1f4; color: #424a53; }
.chip.split { background: #e1ecf7; color: #1b4b7a; }
.chip code { font-size: 11px; }
.pin { font-size: 11px; color: #9a6700; background: #fff8c5; border-radius: 6px;
  padding: 0 5px; }
.pill { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
  background: #eef1f4; }
.pill.selective { background: #fff1d6; color: #7d4e00; }
.pill.full { background: #ffe2e0; color: #8e1b12; }
.legend { display: flex; flex-wrap: wrap; gap: 14px; margin: 6px 0; font-size: 12px;
  color: #424a53; }
.legend span::before { content: ""; display: inline-block; width: 11px; height: 11px;
  border-radius: 2px; margin-right: 5px; vertical-align: -1px; background: var(--c); }
svg { display: block; max-width: 100%; height: auto; }
svg text { font-family: inherit; }
"""


def legend(keys) -> str:
    """A row of swatches for memory kinds or series, in the order given."""
    table = {**MEMORY_KINDS, **SERIES}
    return "<div class=\"legend\">" + "".join(
        f"<span style=\"--c:{table[k][1]}\">{escape(table[k][0])}</span>" for k in keys) + \
        "</div>"


def _svg(width: float, height: float, body: list, cls: str = "") -> str:
    return (f"<svg class=\"{cls}\" width=\"{width:.0f}\" height=\"{height:.0f}\" "
            f"viewBox=\"0 0 {width:.0f} {height:.0f}\" role=\"img\">" + "".join(body) +
            "</svg>")


def _text(x, y, s, size=12, anchor="start", fill=INK, weight="normal", extra="") -> str:
    return (f"<text x=\"{x:.1f}\" y=\"{y:.1f}\" font-size=\"{size}\" text-anchor=\"{anchor}\" "
            f"fill=\"{fill}\" font-weight=\"{weight}\"{extra}>{escape(str(s))}</text>")


def _rect(x, y, w, h, fill, title="", extra="", rx=0) -> str:
    tip = f"<title>{escape(title)}</title>" if title else ""
    return (f"<rect x=\"{x:.2f}\" y=\"{y:.2f}\" width=\"{max(w, 0):.2f}\" height=\"{h:.2f}\" "
            f"rx=\"{rx}\" fill=\"{fill}\"{extra}>{tip}</rect>")


def nice_ticks(top: float, count: int = 5, base: int = 1000) -> list:
    """Round values from 0 to at least ``top``, about ``count`` steps apart; round in
    powers of ``base`` (1024 for bytes, which read in KiB, MiB, GiB)."""
    if top <= 0:
        return [0.0]
    unit = base ** max(0, math.floor(math.log(top, base))) if base != 1000 else 1
    raw = top / unit / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw) * unit
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def split_bar(compute_s: float, comm_s: float, width: float, scale: float | None = None) -> str:
    """A small horizontal bar of compute then communication, ``scale`` seconds wide (their
    sum where None)."""
    total = compute_s + comm_s
    scale = scale or total or 1.0
    a, b = width * compute_s / scale, width * comm_s / scale
    tip = (f"compute {format_seconds(compute_s)}, communication {format_seconds(comm_s)}")
    body = [_rect(0, 0, width, 10, "#eef1f4", rx=2),
            _rect(0, 0, a, 10, COMPUTE, tip), _rect(a, 0, b, 10, COMMUNICATION, tip)]
    return _svg(width, 10, body, "bar")


# -- the mesh ------------------------------------------------------------------------------

def mesh_svg(mesh: dict, panel_labels: dict) -> str:
    """The devices as a grid: the last mesh axis across, the one before it down, one panel
    per coordinate of the axes before those (with ``panel_labels`` by the first axis's
    coordinate: the pipeline's stages); each device labelled by rank and coordinate."""
    axes = list(mesh.items()) or [("device", 1)]
    world = math.prod(n for _, n in axes)
    if world > MAX_DRAWN:
        return (f"<p class=\"note\">{world} devices: "
                + escape(" × ".join(f"{a}={n}" for a, n in axes)) + " (too many to draw)</p>")
    # a panel per coordinate of the leading axes (always of the pipeline's)
    lead = axes[:max(len(axes) - 2, 1 if panel_labels else 0)]
    inner = axes[len(lead):]
    ncols = inner[-1][1] if inner else 1
    nrows = inner[-2][1] if len(inner) > 1 else 1
    npanels = world // (ncols * nrows)
    cw = 84 if ncols <= 8 else max(34, 680 // ncols)
    ch = 44 if cw >= 60 else 30
    pad, head = 12, 46
    pw, ph = ncols * cw + 2 * pad + 18, nrows * ch + head + pad
    pw = max(pw, 6.4 * max(map(len, panel_labels.values()), default=0) + 2 * pad)
    per_line = max(1, min(npanels, (WIDTH + 16) // (pw + 16)))
    lines = math.ceil(npanels / per_line)
    body = []
    strides = [math.prod(n for _, n in axes[i + 1:]) for i in range(len(axes))]
    for k in range(npanels):
        px, py = (k % per_line) * (pw + 16), (k // per_line) * (ph + 16)
        first = k * ncols * nrows
        coords = [(first // strides[i]) % n for i, (_, n) in enumerate(axes)]
        title = " · ".join(f"{a}={c}" for (a, _), c in zip(lead, coords)) or "mesh"
        staged = bool(panel_labels)
        shade = ("#f3f7fb", "#f8f5ee")[k % 2] if staged else "#f6f8fa"
        body.append(_rect(px, py, pw, ph, shade, extra=f" stroke=\"{LINE}\"", rx=8))
        body.append(_text(px + pad, py + 18, title, 12, weight="600"))
        label = panel_labels.get(coords[0]) if staged else None
        if label:
            body.append(_text(px + pad, py + 33, label, 11, fill=MUTED))
        across = f"{inner[-1][0]} →" if ncols > 1 else ""
        body.append(_text(px + pw - pad, py + 18, across, 11, "end", MUTED))
        if nrows > 1:
            x, y = px + pad + 6, py + head + nrows * ch / 2
            body.append(_text(x, y, f"{inner[-2][0]} ↓", 11, "middle", MUTED,
                              extra=f" transform=\"rotate(-90 {x:.1f} {y:.1f})\""))
        for i in range(nrows):
            for j in range(ncols):
                rank = first + i * ncols + j
                c = [(rank // strides[t]) % n for t, (_, n) in enumerate(axes)]
                x, y = px + pad + 18 + j * cw, py + head + i * ch
                where = ", ".join(f"{a}={v}" for (a, _), v in zip(axes, c))
                body.append(f"<g class=\"device\" data-rank=\"{rank}\">" +
                            _rect(x + 2, y + 2, cw - 4, ch - 4, "#ffffff",
                                  f"rank {rank}: {where}", f" stroke=\"{LINE}\"", rx=5))
                if cw >= 60:
                    body.append(_text(x + cw / 2, y + 18, f"rank {rank}", 12, "middle",
                                      weight="600"))
                    body.append(_text(x + cw / 2, y + 33, "(" + ",".join(map(str, c)) + ")",
                                      11, "middle", MUTED))
                else:
                    body.append(_text(x + cw / 2, y + ch / 2 + 4, rank, 10, "middle"))
                body.append("</g>")
    width = per_line * (pw + 16) - 16
    return _svg(width, lines * (ph + 16) - 16, body, "mesh")


# -- memory ---------------------------------------------------------------------------------

def memory_svg(bars) -> str:
    """Stacked horizontal bars, one per group of devices (:class:`report.MemoryBar`), on one
    scale; a dashed line at a group's capacity where it is within reach of the scale."""
    left, right, row, bar_h = 200, 170, 82, 26
    plot = WIDTH - left - right
    peak = max(b.peak_bytes for b in bars) or 1.0
    caps = [b.capacity_bytes for b in bars if b.capacity_bytes and
            b.capacity_bytes <= 4 * peak]
    top = max([peak] + caps) * 1.04
    body = []
    for i, b in enumerate(bars):
        y = 8 + i * row
        body.append(_text(0, y + 12, b.label, 13, weight="600"))
        body.append(_text(0, y + 28, f"rank{'s' if '–' in b.ranks else ''} {b.ranks}", 11,
                          fill=MUTED))
        stage = f" data-stage=\"{b.stage}\"" if b.stage is not None else ""
        body.append(f"<g class=\"mem-bar\" data-peak-bytes=\"{b.peak_bytes!r}\" "
                    f"data-ranks=\"{b.ranks}\"{stage}>")
        x = left
        for s in b.segments:
            w = plot * s.num_bytes / top
            words = MEMORY_KINDS.get(s.kind, (s.kind,))[0]
            share = s.num_bytes / b.peak_bytes if b.peak_bytes else 0.0
            body.append(_rect(x, y, w, bar_h, MEMORY_KINDS.get(s.kind, ("", "#999"))[1],
                              f"{b.label}, {words}: {format_bytes(s.num_bytes)} ({share:.0%})",
                              f" class=\"seg\" data-kind=\"{s.kind}\" "
                              f"data-bytes=\"{s.num_bytes!r}\""))
            if w > 64:
                body.append(_text(x + w / 2, y + 17, format_bytes(s.num_bytes), 11, "middle",
                                  "#ffffff" if s.kind in ("parameters", "buckets") else INK,
                                  extra=" pointer-events=\"none\""))
            x += w
        body.append("</g>")
        body.append(_text(x + 8, y + 17, format_bytes(b.peak_bytes), 13, weight="600"))
        parts = " · ".join(f"{MEMORY_KINDS.get(s.kind, (s.kind,))[0]} "
                           f"{format_bytes(s.num_bytes)}" for s in b.segments)
        body.append(_text(left, y + bar_h + 15, parts, 11))
        body.append(_text(left, y + bar_h + 29, b.point, 11, fill=MUTED))
        if b.capacity_bytes and b.capacity_bytes in caps:
            cx = left + plot * b.capacity_bytes / top
            body.append(f"<line x1=\"{cx:.1f}\" x2=\"{cx:.1f}\" y1=\"{y - 4}\" "
                        f"y2=\"{y + bar_h + 4}\" stroke=\"{CAPACITY}\" stroke-width=\"2\" "
                        f"stroke-dasharray=\"4 3\"><title>capacity "
                        f"{escape(format_bytes(b.capacity_bytes))}</title></line>")
            body.append(_text(cx + 4, y - 6, f"capacity {format_bytes(b.capacity_bytes)}",
                              10, fill=CAPACITY))
    height = 8 + len(bars) * row
    body += _x_axis(left, plot, top, height, format_bytes, 1024)
    return _svg(WIDTH, height + 24, body, "memory")


def _x_axis(left, plot, top, y, fmt, base=1000) -> list:
    out = [(f"<line x1=\"{left}\" x2=\"{left + plot}\" y1=\"{y}\" y2=\"{y}\" "
            f"stroke=\"{LINE}\"/>")]
    for t in nice_ticks(top, base=base):
        if t > top:
            break
        x = left + plot * t / top
        out.append(f"<line x1=\"{x:.1f}\" x2=\"{x:.1f}\" y1=\"{y}\" y2=\"{y + 4}\" "
                   f"stroke=\"{MUTED}\"/>")
        out.append(_text(x, y + 16, fmt(t) if t else "0", 10, "middle", MUTED))
    return out


# -- time per layer -------------------------------------------------------------------------

def time_svg(rows) -> str:
    """A column per layer (:class:`report.LayerRow`): compute below, communication on top."""
    staged = any(r.stage is not None for r in rows)
    left, top_pad, plot_h = 64, 26 if staged else 10, 200
    n = max(len(rows), 1)
    col = min(110.0, max(10.0, (WIDTH - left) / n))
    longest = max((len(r.name) for r in rows), default=4)
    slanted = col < 7 * longest + 10
    label_h = 16 + (6.2 * min(longest + 4, 28) * 0.72 if slanted else 0)
    most = max((r.compute_s + r.comm_s for r in rows), default=0.0) or 1.0
    ticks = nice_ticks(most, 4)
    scale = ticks[-1] if ticks[-1] > 0 else most
    body = []
    base = top_pad + plot_h
    if staged:   # a band behind each stage's layers
        runs = []
        for i, r in enumerate(rows):
            if runs and runs[-1][0] == r.stage:
                runs[-1][2] = i + 1
            else:
                runs.append([r.stage, i, i + 1])
        for k, (stage, lo, hi) in enumerate(runs):
            x = left + lo * col
            body.append(_rect(x, 2, (hi - lo) * col, base - 2,
                              ("#f3f7fb", "#f8f5ee")[k % 2]))
            body.append(_text(x + 6, 16, f"stage {stage}", 11, fill=MUTED, weight="600"))
    for t in ticks:
        y = base - plot_h * t / scale
        body.append(f"<line x1=\"{left}\" x2=\"{left + n * col:.1f}\" y1=\"{y:.1f}\" "
                    f"y2=\"{y:.1f}\" stroke=\"#eef1f4\"/>")
        body.append(_text(left - 6, y + 4, format_seconds(t) if t else "0", 10, "end", MUTED))
    for i, r in enumerate(rows):
        x = left + i * col + col * 0.15
        w = col * 0.7
        hc, hm = plot_h * r.compute_s / scale, plot_h * r.comm_s / scale
        stage = f" data-stage=\"{r.stage}\"" if r.stage is not None else ""
        tip = (f"{r.name}: compute {format_seconds(r.compute_s)}, communication "
               f"{format_seconds(r.comm_s)}")
        body.append(f"<g class=\"tcol\" data-layer=\"{escape(r.name)}\"{stage}>" +
                    _rect(x, base - hc, w, hc, COMPUTE, tip) +
                    _rect(x, base - hc - hm, w, hm, COMMUNICATION, tip) + "</g>")
        cx = x + w / 2
        if slanted:
            body.append(_text(cx, base + 12, r.name, 10, "end", MUTED,
                              extra=f" transform=\"rotate(-40 {cx:.1f} {base + 12:.1f})\""))
        else:
            body.append(_text(cx, base + 14, r.name, 10, "middle", MUTED))
    body.append(f"<line x1=\"{left}\" x2=\"{left + n * col:.1f}\" y1=\"{base}\" "
                f"y2=\"{base}\" stroke=\"{LINE}\"/>")
    return _svg(max(left + n * col + 10, 200), base + label_h, body, "time")


# -- the pipeline schedule ------------------------------------------------------------------

def timeline_svg(tl) -> str:
    """The played schedule (:class:`report.Timeline`): a row per group of devices, a box per
    forward (light) and backward (dark) of each micro-batch, numbered from 1 (a group's
    second chunk of layers, interleaved, in other tones), then the step's gradient sums
    and optimizer."""
    left, row, box_h = 190, 34, 24
    plot = WIDTH - left - 20
    step = tl.step_s or 1.0
    body = []
    for g, label in enumerate(tl.rows):
        y = 6 + g * row
        body.append(_text(0, y + 16, label, 12, weight="600"))
        body.append(_rect(left, y, plot, box_h, "#f6f8fa", rx=3))
    for sp in tl.spans:
        a = sp.action
        y = 6 + sp.group * row
        x, w = left + plot * sp.start_s / step, plot * (sp.end_s - sp.start_s) / step
        fwd = a.kind == "F"
        what = "forward" if fwd else "backward"
        chunk = a.stage // len(tl.rows)
        fill = SERIES[what if chunk % 2 == 0 else f"{what}-later"][1]
        tip = (f"stage {a.stage}, {what} of micro-batch {a.micro + 1}: "
               f"{format_seconds(sp.start_s)} – {format_seconds(sp.end_s)}")
        body.append(f"<g class=\"action\" data-stage=\"{a.stage}\" data-kind=\"{a.kind}\" "
                    f"data-micro=\"{a.micro}\" data-start-s=\"{sp.start_s!r}\" "
                    f"data-end-s=\"{sp.end_s!r}\">" +
                    _rect(x + 0.5, y, w - 1, box_h, fill, tip, rx=3))
        if w >= 14:
            body.append(_text(x + w / 2, y + 16, a.micro + 1, 11, "middle",
                              INK if fwd else "#ffffff", extra=" pointer-events=\"none\""))
        body.append("</g>")
    for g, (start, end) in enumerate(tl.fixed):
        if end > start:
            y = 6 + g * row
            body.append(_rect(left + plot * start / step, y, plot * (end - start) / step,
                              box_h, SERIES["fixed"][1],
                              f"gradient sums and optimizer: {format_seconds(end - start)}",
                              " class=\"fixed\"", rx=3))
    height = 6 + len(tl.rows) * row
    body += _x_axis(left, plot, step, height, format_seconds)
    return _svg(WIDTH, height + 24, body, "timeline")
