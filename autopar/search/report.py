"""The plan as one self-contained HTML page: the devices and mesh, what runs on each mesh
axis, the pipeline's stages and schedule, memory per device, time per layer, and every
layer's layouts and their meaning.

Everything is drawn here, as inline SVG and CSS: the page loads nothing when it is viewed.
The elements a reader (or a test) may want to find carry data attributes: ``data-layer`` on
each layer's row and column, ``data-peak-bytes`` on each memory bar and ``data-kind`` and
``data-bytes`` on its parts, ``data-stage``, ``data-kind`` and ``data-micro`` on each action
of the schedule.
"""

from __future__ import annotations

import pathlib
from html import escape
from typing import NamedTuple

from ..program.graph import block_of
from ..program.placement import format_placement, is_partial, is_shard
from ..units import format_bytes, format_seconds
from . import report_charts as charts

TOP_LEVEL = "(top level)"
# A layout signature shared by more parameters of a layer than this is listed by count.
MAX_NAMES = 6


class LayerRow(NamedTuple):
    """One row of the per-layer grid: a block of the module hierarchy (or a top-level
    module), the pipeline stage it runs in (None without stages), its ops' predicted
    seconds, how its ops' outputs are split per mesh axis, and its parameters."""

    name: str
    stage: int | None
    ops: int
    compute_s: float
    comm_s: float
    work: dict          # mesh axis -> {"batch" | "dim d" | "partial" | "whole": op count}
    params: list        # parameter FQNs, in the plan's order


class Segment(NamedTuple):
    kind: str           # one of charts.MEMORY_KINDS
    num_bytes: float


class Breakdown(NamedTuple):
    """Bytes per device by kind (:class:`Segment`), and when in the step they are held."""

    segments: list
    point: str


class MemoryBar(NamedTuple):
    """The memory of one group of alike devices at its peak: ``segments`` add up to
    ``peak_bytes``; ``point`` says when in the step the peak falls."""

    label: str
    ranks: str
    stage: int | None
    peak_bytes: float
    segments: list
    point: str
    capacity_bytes: float | None


def write_report(plan, path) -> pathlib.Path:
    """Write ``plan`` as one self-contained HTML page to ``path``; returns the path."""
    out = pathlib.Path(path)
    out.write_text(render(plan), encoding="utf-8")
    return out


def render(plan) -> str:
    """The page of ``plan``, as HTML text."""
    rows = layer_rows(plan)
    bars = memory_bars(plan)
    body = [_header(plan, bars), _axes_section(plan)]
    if plan.stages:
        body.append(_pipeline_section(plan))
    body += [_memory_section(bars), _time_section(plan, rows), _layers_section(plan, rows)]
    mesh = " × ".join(f"{a}={n}" for a, n in plan.mesh.items()) or "one device"
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>autopar plan · {escape(mesh)}</title>"
            f"<style>{charts.CSS}</style></head>\n<body><main>\n" + "\n".join(body) +
            "\n</main></body></html>\n")


# -- what the page shows -------------------------------------------------------------------

def layer_rows(plan) -> list:
    """The per-layer rows of ``plan``, in program order: each block of the ops' modules
    (``h.0``) or top-level module (``wte``), ops outside every module as ``(top level)``;
    a pipeline's rows split by stage. Parameters go with the block of their name; a
    block holding parameters but no ops comes after the rest of its stage."""
    stage_of = _stage_of_layer(plan)
    op_axes = list(plan.op_mesh)
    rows, stage = {}, 0 if plan.stages else None
    for v in plan.nodes.values():
        block = block_of(v.get("module", "")) or TOP_LEVEL
        if stage is not None:
            stage = stage_of.get(block, stage)
        r = rows.setdefault((stage, block), _new_row(op_axes))
        r["ops"] += 1
        r["compute_s"] += v.get("compute_s", 0.0)
        r["comm_s"] += v.get("comm_s", 0.0)
        for axis, p in zip(op_axes, v["output"]):
            what = _work_kind(p)
            r["work"][axis][what] = r["work"][axis].get(what, 0) + 1
    aliases = plan.stats.get("aliases", {})
    for fqn in [*plan.placements, *(a for f in plan.placements for a in aliases.get(f, ()))]:
        block = block_of(fqn) or TOP_LEVEL
        key = next((k for k in rows if k[1] == block),
                   (stage_of.get(block, 0) if plan.stages else None, block))
        rows.setdefault(key, _new_row(op_axes))["params"].append(fqn)
    position = {k: i for i, k in enumerate(rows)}
    order = sorted(rows, key=lambda k: (k[0] or 0, position[k]))
    return [LayerRow(block, stage, **rows[(stage, block)]) for stage, block in order]


def _new_row(op_axes) -> dict:
    return {"ops": 0, "compute_s": 0.0, "comm_s": 0.0, "work": {a: {} for a in op_axes},
            "params": []}


def _stage_of_layer(plan) -> dict:
    return {layer: s for s, st in enumerate(plan.stages) for layer in st.get("layers", ())}


def _ranks(lo: int, hi: int) -> str:
    return f"{lo}–{hi}" if hi > lo else str(lo)


def _work_kind(p) -> str:
    if is_partial(p):
        return "partial"
    if is_shard(p):
        return "batch" if p.dim == 0 else f"dim {p.dim}"
    return "whole"


def memory_bars(plan) -> list:
    """One :class:`MemoryBar` per group of alike devices: every device of a plan without
    stages, each stage of a pipeline."""
    if not plan.stages:
        n = plan.world_size
        segments, point = memory_segments(plan.cost, plan.cost.memory_bytes_per_device)
        return [MemoryBar("every device", _ranks(0, n - 1), None,
                          plan.cost.memory_bytes_per_device, segments, point,
                          plan.stats.get("memory_budget_bytes"))]
    out = []
    for s, st in enumerate(plan.stages):
        total = float(st["memory_bytes"])
        if "cost" in st:
            cost = type(plan.cost)(**st["cost"])
            held = st.get("micro_batches_held", 1)
            segments, point = memory_segments(cost, total, (held - 1) * cost.saved_bytes)
        else:
            segments, point = [Segment("total", total)], "stage total (no parts recorded)"
        out.append(MemoryBar(f"stage {s}", _ranks(*st["ranks"]), s, total,
                             segments, point, st.get("budget_bytes")))
    return out


def memory_segments(cost, total: float, held_bytes: float = 0.0) -> Breakdown:
    """The :class:`Breakdown` of ``total`` bytes per device, its segments adding up to it:
    the parts ``cost`` gives at the point of the step its peak falls (the forward pass's
    most, or late in backward: the parameters' storage, the gradient-sum buckets, and what
    else it holds then), plus ``held_bytes`` of activations (of the other micro-batches a
    pipeline stage holds)."""
    static = [Segment("parameters", cost.parameter_bytes),
              Segment("gradients", cost.gradient_bytes),
              Segment("optimizer", cost.optimizer_bytes)]
    forward = static + [Segment("activations", cost.activation_bytes),
                        Segment("transient", cost.transient_bytes)]
    base = total - held_bytes
    if sum(s.num_bytes for s in forward) >= base * (1 - 1e-9):
        parts, point = forward, "at the forward pass's peak"
    else:
        parts = static + [Segment("buckets", cost.bucket_bytes)]
        parts.append(Segment("transient", base - sum(s.num_bytes for s in parts)))
        point = "late in backward (gradients summed in buckets)"
    if held_bytes:
        parts.append(Segment("activations", held_bytes))
        point += f"; with {format_bytes(held_bytes)} of activations of the other " \
                 "micro-batches the stage holds"
    merged = {}
    for s in parts:
        merged[s.kind] = merged.get(s.kind, 0.0) + s.num_bytes
    rest = total - sum(merged.values())
    if rest < -1e-9 * total:   # parts beyond the total: show the total alone
        return Breakdown([Segment("total", total)], point)
    if rest > 1e-9 * total:
        merged["other"] = rest
    order = list(charts.MEMORY_KINDS)
    return Breakdown([Segment(k, merged[k]) for k in sorted(merged, key=order.index)
                      if merged[k] > 0], point)


class Timeline(NamedTuple):
    """The pipeline schedule as played: per row (a group of devices) its label, the
    actions' spans (:class:`autopar.search.stages.Span`), and the step's end per group
    after its gradient sums and optimizer; ``exact``: played with the planner's own
    per-stage times."""

    rows: list
    spans: list
    fixed: list         # per row: (start_s, end_s) of gradient sums and optimizer
    step_s: float
    exact: bool


def schedule_timeline(plan) -> Timeline:
    """The schedule of ``plan``'s stages played (:func:`autopar.search.stages.play`) with
    each stage's forward, backward and hand-over seconds as planned; where a plan records
    only each stage's step, one micro-batch takes that over the micro-batches, backward
    :data:`~autopar.search.stages.BACKWARD_SHARE` of it."""
    from ..options import schedule_chunks
    from . import stages as S
    name, v = schedule_chunks(plan.schedule or "gpipe")
    n, m = len(plan.stages), max(plan.micro_batches, 1)
    p = max(n // v, 1)
    exact = all("forward_s" in st for st in plan.stages)
    if exact:
        fwd = [st["forward_s"] for st in plan.stages]
        bwd = [st["backward_s"] for st in plan.stages]
        transfer = [st["transfer_s"] for st in plan.stages[:-1]]
        fixed = [0.0] * p
        for s, st in enumerate(plan.stages):
            fixed[s % p] += st["fixed_s"]
    else:
        fwd = [st["time_s"] / m * (1 - S.BACKWARD_SHARE) for st in plan.stages]
        bwd = [st["time_s"] / m * S.BACKWARD_SHARE for st in plan.stages]
        transfer, fixed = [0.0] * (n - 1), [0.0] * p
    played = S.play(S.schedule_orders(name, p, v, m), fwd, bwd, transfer or [0.0], fixed)
    rows = []
    for g in range(p):
        mine = [s for s in range(n) if s % p == g]
        st = plan.stages[mine[0]]
        stages = ", ".join(str(s) for s in mine)
        rows.append(f"stage{'s' if len(mine) > 1 else ''} {stages} · "
                    f"rank{'s' if st['ranks'][1] > st['ranks'][0] else ''} "
                    f"{_ranks(*st['ranks'])}")
    ends = [max(sp.end_s for sp in played.spans if sp.group == g) for g in range(p)]
    return Timeline(rows, played.spans, [(e, e + f) for e, f in zip(ends, fixed)],
                    played.step_s, exact)


# -- sections -------------------------------------------------------------------------------

def _header(plan, bars) -> str:
    c = plan.cost
    mesh = " × ".join(f"{a}={n}" for a, n in plan.mesh.items()) or "one device"
    peak = max((b.peak_bytes for b in bars), default=c.memory_bytes_per_device)
    share = c.comm_s / (c.compute_s + c.comm_s) if c.compute_s + c.comm_s else 0.0
    cards = [
        ("predicted step", format_seconds(c.total_s),
         (f"compute {format_seconds(c.compute_s)} · communication "
          f"{format_seconds(c.comm_s)}"), charts.split_bar(c.compute_s, c.comm_s, 200)),
        ("peak memory per device", format_bytes(peak),
         "the most any device holds" if plan.stages else
         f"on each of {plan.world_size} devices", ""),
        ("mesh", mesh, f"{plan.world_size} devices", "")]
    if plan.stages:
        bubble = plan.stats.get("pipeline", {}).get("bubble")
        cards.append(("pipeline", f"{len(plan.stages)} stages",
                      f"{plan.schedule}, {plan.micro_batches} micro-batches" +
                      (f", bubble {bubble:.0%}" if bubble is not None else ""), ""))
    elif plan.micro_batches > 1:
        cards.append(("micro-batches", str(plan.micro_batches),
                      "gradients summed before one optimizer step", ""))
    html = ["<header>", "<h1>autopar plan</h1>",
            (f"<p class=\"sub\">{escape(plan.cluster or 'cluster not recorded')} · mesh "
             f"{escape(mesh)} · communication {share:.0%} of the ops' time</p>"),
            "<div class=\"cards\">"]
    for key, value, detail, extra in cards:
        html.append(f"<div class=\"card\"><div class=\"k\">{escape(key)}</div>"
                    f"<div class=\"v\">{escape(value)}</div>"
                    f"<div class=\"d\">{escape(detail)}</div>{extra}</div>")
    html.append("</div>")
    if plan.optimality_text():
        html.append(f"<p class=\"note\">{escape(plan.optimality_text())}</p>")
    html.append("<h2>Devices</h2>")
    html.append("<p class=\"note\">Each box is one device, labelled by its rank and its "
                "coordinate on the mesh" + ("; the shaded panels are the pipeline's "
                                             "stages." if plan.stages else ".") + "</p>")
    html.append(charts.mesh_svg(plan.mesh, _panel_labels(plan)))
    html.append("</header>")
    return "\n".join(html)


def _panel_labels(plan) -> dict:
    """Per coordinate on the pipeline axis: what that group of devices runs."""
    if not plan.stages or "pp" not in plan.mesh:
        return {}
    per = plan.world_size // plan.mesh["pp"]
    out = {}
    for s, st in enumerate(plan.stages):
        g = st["ranks"][0] // per
        layers = st.get("layers") or []
        span = layers[0] if len(layers) == 1 else \
            f"{layers[0]}–{layers[-1]}" if layers else "no layers"
        text = f"stage {s}: {st.get('device', '')}, {span}"
        out[g] = f"{out[g]}; {text}" if g in out else text
    return out


def _axes_section(plan) -> str:
    lines = plan.axis_summary()[1:]
    items = []
    for line in lines:
        head, _, rest = line.strip().partition(": ")
        items.append(f"<li><b>{escape(head)}</b> {escape(rest)}</li>")
    return ("<section id=\"axes\"><h2>What runs on each mesh axis</h2>"
            f"<ul class=\"axes\">{''.join(items)}</ul></section>")


def _pipeline_section(plan) -> str:
    rows = []
    for s, st in enumerate(plan.stages):
        layers = st.get("layers") or []
        span = ", ".join(layers) if len(layers) <= 4 else \
            f"{layers[0]} – {layers[-1]} ({len(layers)} layers)"
        mesh = " × ".join(f"{a}={n}" for a, n in st.get("mesh", {}).items()) or "one device"
        budget = st.get("budget_bytes")
        rows.append(
            f"<tr data-stage=\"{s}\"><td>{s}</td>"
            f"<td>{escape(str(st.get('device', '')))}</td>"
            f"<td>{_ranks(*st['ranks'])}</td><td>{escape(span)}</td>"
            f"<td>{escape(mesh)}</td><td class=\"num\">{format_seconds(st['time_s'])}</td>"
            f"<td class=\"num\">{format_bytes(st['memory_bytes'])}"
            + (f" <span class=\"muted\">of {format_bytes(budget)}</span>" if budget else "")
            + f"</td><td class=\"num\">{st.get('micro_batches_held', '')}</td></tr>")
    table = ("<table class=\"stages\"><thead><tr><th>stage</th><th>devices</th><th>ranks</th>"
             "<th>layers</th><th>mesh</th><th class=\"num\">stage step</th>"
             "<th class=\"num\">memory per device</th><th class=\"num\">micro-batches "
             "held</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    tl = schedule_timeline(plan)
    note = ("Each stage's forward and backward of one micro-batch as planned, played in the "
            "schedule's order; a stage waits for the values of the stage before it (and "
            "their hand-over) before it starts." if tl.exact else
            "This plan records only each stage's step: a micro-batch's forward and backward "
            "are drawn as that step shared out evenly.")
    series = ["forward", "backward", "fixed"]
    if len(tl.rows) < len(plan.stages):
        note += (" Each group of devices runs several stages (chunks of layers), told "
                 "apart by colour.")
        series[2:2] = ["forward-later", "backward-later"]
    return ("<section id=\"pipeline\"><h2>Pipeline stages</h2>" + table +
            f"<h3>Schedule: {escape(plan.schedule)}, {plan.micro_batches} micro-batches</h3>"
            f"<p class=\"note\">{escape(note)}</p>" +
            charts.legend(series) + charts.timeline_svg(tl) +
            "</section>")


def _memory_section(bars) -> str:
    notes = []
    far = [b for b in bars if b.capacity_bytes and
           b.capacity_bytes > 4 * max(x.peak_bytes for x in bars)]
    if far:
        notes.append("capacity per device, off the scale: " + "; ".join(
            f"{b.label} {format_bytes(b.capacity_bytes)} "
            f"({_share(b.peak_bytes / b.capacity_bytes)} used)" for b in far))
    if any(s.kind == "total" for b in bars for s in b.segments):
        notes.append("the plan records no parts of this memory: its totals are drawn whole")
    caption = ("What one device holds at its peak, by kind: the parameters, their gradients "
               "and optimizer states in their stored layouts, activations saved for "
               "backward, and transient values.")
    return ("<section id=\"memory\"><h2>Memory per device</h2>"
            f"<p class=\"note\">{escape(caption)}</p>" + charts.legend(
                [k for k in charts.MEMORY_KINDS if any(s.kind == k for b in bars
                                                       for s in b.segments)]) +
            charts.memory_svg(bars) +
            "".join(f"<p class=\"note\">{escape(n)}</p>" for n in notes) + "</section>")


def _share(x: float) -> str:
    return f"{x:.0%}" if x >= 0.01 else f"{x * 100:.2g}%" if x >= 1e-6 else "under 0.0001%"


def _time_section(plan, rows) -> str:
    compute = sum(r.compute_s for r in rows)
    comm = sum(r.comm_s for r in rows)
    where = "a device of its stage" if plan.stages else "one device"
    caption = (f"Predicted seconds per step of each layer's ops on {where}: compute "
               f"{format_seconds(compute)}, communication {format_seconds(comm)} in all.")
    rest = plan.cost.compute_s - compute
    if not plan.stages and rest > 1e-3 * plan.cost.compute_s:
        caption += (f" The step's other {format_seconds(rest)} of compute is the optimizer's "
                    "update of the parameters, outside every layer.")
    return ("<section id=\"time\"><h2>Time per layer</h2>"
            f"<p class=\"note\">{escape(caption)}</p>" +
            charts.legend(["compute", "communication"]) + charts.time_svg(rows) +
            "</section>")


def _layers_section(plan, rows) -> str:
    most = max((r.compute_s + r.comm_s for r in rows), default=0.0)
    stages = bool(plan.stages)
    head = ("<tr><th>layer</th>" + ("<th>stage</th>" if stages else "") +
            "<th>ops' outputs per axis</th><th>parameters: layout per axis, stored → used, "
            "meaning</th><th>recompute</th><th>time per step</th></tr>")
    body = []
    for r in rows:
        t = r.compute_s + r.comm_s
        attrs = (f" data-layer=\"{escape(r.name)}\" data-compute-s=\"{r.compute_s!r}\" "
                 f"data-comm-s=\"{r.comm_s!r}\"" +
                 (f" data-stage=\"{r.stage}\"" if r.stage is not None else ""))
        choice = plan.recompute.get(r.name)
        body.append(
            f"<tr class=\"layer\"{attrs}><td class=\"lname\"><code>{escape(r.name)}</code>"
            f"<div class=\"muted\">{r.ops} op{'s' if r.ops != 1 else ''}</div></td>" +
            (f"<td class=\"num\">{r.stage}</td>" if stages else "") +
            f"<td class=\"work\">{_work_cell(r)}</td><td>{_params_cell(plan, r)}</td>"
            f"<td>{_pill(choice) if choice else '<span class=muted>—</span>'}</td>"
            f"<td class=\"tcell\">{charts.split_bar(r.compute_s, r.comm_s, 150, most)}"
            f"<div class=\"muted\">{format_seconds(t)}"
            + (f" · {r.comm_s / t:.0%} comm" if t and r.comm_s else "") + "</div></td></tr>")
    return ("<section id=\"layers\"><h2>Layers</h2><p class=\"note\">Every layer in program "
            "order. A layout has one placement per mesh axis: R replicated, S(d) split on "
            "tensor dim d, P partial sums. Where a parameter is stored split but used whole "
            "(or the other way), both are shown.</p>"
            f"<table class=\"layers\"><thead>{head}</thead><tbody>{''.join(body)}</tbody>"
            "</table></section>")


def _work_cell(r) -> str:
    if not r.ops:
        return "<span class=\"muted\">no ops</span>"
    lines = []
    for axis, kinds in r.work.items():
        if set(kinds) == {"whole"}:
            text = "whole on every device"
        else:
            text = " · ".join(f"{n} {_WORK_WORDS.get(k, 'split on ' + k)}"
                              for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
        lines.append(f"<div><span class=\"axis\">{escape(axis)}</span> {escape(text)}</div>")
    return "".join(lines) or "<span class=\"muted\">whole: no axis to split over</span>"


_WORK_WORDS = {"batch": "batch split", "partial": "partial sums", "whole": "whole"}


def _params_cell(plan, r) -> str:
    if not r.params:
        return "<span class=\"muted\">no parameters</span>"
    groups = {}
    first = {a: f for f, more in plan.stats.get("aliases", {}).items() for a in more}
    for name in r.params:
        fqn = first.get(name, name)   # a tied weight under its other name: the first's
        stored = plan.placements[fqn]
        used = tuple(dict.fromkeys(u.layout for u in plan.uses.get(fqn, ())))
        roles = dict(part.split(": ", 1) for part in plan.role(fqn).split("; ") if part)
        key = (stored, used, tuple(roles.items()))
        groups.setdefault(key, []).append(name if name == fqn else f"{name} (= {fqn})")
    out = []
    for (stored, used, roles), names in groups.items():
        chips = []
        for i, (axis, role) in enumerate(roles):
            text = format_placement(stored[i])
            seen = list(dict.fromkeys(format_placement(u[i]) for u in used))
            if seen and seen != [text]:
                text += " → " + "/".join(seen)
            batch = r.work.get(axis, {}).get("batch", 0) > r.ops / 2
            meaning = role + (", batch split" if batch and role == "replicated" else "")
            kind = "split" if is_shard(stored[i]) or any(is_shard(u[i]) for u in used) \
                else "rep"
            chips.append(f"<span class=\"chip {kind}\"><b>{escape(axis)}</b> "
                         f"<code>{escape(text)}</code> {escape(meaning)}</span>")
        short = [n[len(r.name) + 1:] if n.startswith(r.name + ".") else n for n in names]
        shown = ", ".join(short[:MAX_NAMES]) + (f" and {len(short) - MAX_NAMES} more"
                                               if len(short) > MAX_NAMES else "")
        pinned = [plan.pinned[n] for n in names if n in plan.pinned]
        out.append(f"<div class=\"pgroup\" data-params=\"{escape(' '.join(names))}\">"
                   f"<div class=\"pnames\" title=\"{escape(', '.join(names))}\">"
                   f"<code>{escape(shown)}</code>" +
                   (f" <span class=\"pin\">pinned ({escape(pinned[0])})</span>"
                    if pinned else "") + "</div>" +
                   ("".join(chips) or "<span class=\"muted\">whole on each device</span>") +
                   "</div>")
    return "".join(out)


def _pill(choice: str) -> str:
    return f"<span class=\"pill {escape(choice)}\">{escape(choice)}</span>"
