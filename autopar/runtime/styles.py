"""Read a plan as DTensor module styles and FSDP groups: what :func:`autopar.apply` does to
a model, found without a process group.

Tensor parallel runs on the one mesh axis where the plan uses parameters split: an
``nn.Linear`` whose weight is used ``S(0)`` (output features split) takes
``ColwiseParallel``, ``S(1)`` (input features split) ``RowwiseParallel``; an
``nn.Embedding`` split on its vocabulary (dim 0) ``RowwiseParallel``, on its embedding dim
(dim 1) ``ColwiseParallel``; biases follow their weight, every other parameter stays whole.
A column-parallel projection's output stays split (a plain tensor of this rank's features)
where the plan keeps it split up to a row-parallel projection of the same parent module:
that region then runs on this rank's heads, so the parent's head counts
(:data:`HEAD_COUNTS`) are divided by the axis size, as torchtitan does. Where the plan
gathers the output (a fused projection cut at a fixed width), the style gathers it too and
the region runs whole.

Data parallel runs on the axis where the plan splits the batch or stores parameters split
while using them whole: one ``fully_shard`` group per repeated block (``layers.3``), then
the root; a group holding a parameter the plan stores split there reshards after forward,
and each parameter is split on the dim the plan stores it split on (0 where it stores it
whole).

Ops the plan splits outside a column/row-parallel pair on the tensor axis (sequence-split
norms, partial sums carried through residual adds) run whole: the same values, at more
activation memory; :attr:`Styles.unmapped` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from ..errors import PlanError
from ..program.placement import (Partial, Replicate, Shard, format_layout, format_placement,
                                 is_partial, is_replicate, is_shard, is_strided)
from ..program.graph import block_of, tensor_names

R, P, S0, S1, LOCAL = Replicate(), Partial(), Shard(0), Shard(1), Shard(-1)

# Attributes counting attention heads, divided by the tensor-parallel size where a module's
# projections keep their heads split (torchtitan divides ``n_heads`` and ``n_kv_heads``).
HEAD_COUNTS = frozenset({"n_head", "n_heads", "n_kv_head", "n_kv_heads", "n_local_heads",
                         "n_local_kv_heads", "num_heads", "num_kv_heads",
                         "num_attention_heads", "num_key_value_heads"})

# module family -> the op its own forward reads its weight with
FAMILY_OP = {"linear": "linear", "embedding": "embedding"}
# (family, weight's placement in use on the tensor axis) -> DTensor's style for it
STYLE_OF = {("linear", S0): "colwise", ("linear", S1): "rowwise",
            ("embedding", S0): "rowwise", ("embedding", S1): "colwise"}
# (family, style) -> parameter -> (placements it may be used in, the one it is stored in)
# on the tensor axis, as the style holds it; a parameter not named here is held whole
HELD = {("linear", "colwise"): {"weight": ((S0,), S0), "bias": ((S0,), S0)},
        ("linear", "rowwise"): {"weight": ((S1,), S1), "bias": ((R, P), R)},
        ("embedding", "rowwise"): {"weight": ((S0,), S0)},
        ("embedding", "colwise"): {"weight": ((S1,), S1)}}
WHOLE = ((R,), R)

REMEDY = "or use autopar.compile, whose ParallelModule runs any plan"
_MAX_OP_PROBLEMS = 8


@dataclass(frozen=True)
class ModuleStyle:
    """How one module runs on the tensor-parallel axis: ``style`` is ``"colwise"`` or
    ``"rowwise"`` (DTensor's ColwiseParallel / RowwiseParallel); ``input`` the layout its
    input arrives in and ``output`` the one it hands on, each ``Replicate()`` (whole) or
    ``Shard(-1)`` (this rank's features, as a plain local tensor)."""

    style: str
    input: object
    output: object

    def parallel_style(self):
        """The DTensor ParallelStyle this describes."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
        cls = ColwiseParallel if self.style == "colwise" else RowwiseParallel
        return cls(input_layouts=self.input, output_layouts=self.output)

    def __str__(self) -> str:
        name = "ColwiseParallel" if self.style == "colwise" else "RowwiseParallel"
        return (f"{name}(input {format_placement(self.input)}, "
                f"output {format_placement(self.output)})")


@dataclass(frozen=True)
class Styles:
    """What :func:`autopar.apply` does to a model for a plan.

    ``tensor_axis`` / ``data_axis``: the mesh axes of tensor and data parallelism (None
    where the plan has none); ``modules``: module FQN -> :class:`ModuleStyle`, in module
    order; ``heads``: module FQN -> {attribute: heads per rank}; ``shard_groups``: module
    FQN ("" the root, last) -> ``reshard_after_forward`` of its ``fully_shard``;
    ``shard_dims``: parameter FQN -> the dim fully_shard splits it on, where the plan
    stores it split on one other than 0; ``tied``: the FQNs of each parameter held by
    several modules; ``unmapped``: the ops the styles run otherwise than the plan (whole
    where it splits them), one line each."""

    tensor_axis: str | None = None
    data_axis: str | None = None
    modules: dict = field(default_factory=dict)
    heads: dict = field(default_factory=dict)
    shard_groups: dict = field(default_factory=dict)
    shard_dims: dict = field(default_factory=dict)
    tied: tuple = ()
    unmapped: tuple = ()

    def explain(self) -> str:
        """The styles as lines of text, one per module, head count and FSDP group."""
        lines = []
        if self.tensor_axis:
            lines.append(f"tensor parallel over {self.tensor_axis}:")
            lines += [f"  {path}: {s}" for path, s in self.modules.items()]
            lines += [f"  {path}.{attr} = {n} per rank" for path, counts in self.heads.items()
                      for attr, n in counts.items()]
        if self.data_axis:
            lines.append(f"data parallel over {self.data_axis} (fully_shard):")
            lines += [f"  {path or '(root)'}: reshard_after_forward={r}"
                      for path, r in self.shard_groups.items()]
            lines += [f"  {fqn} split on dim {d}" for fqn, d in self.shard_dims.items()]
        if self.unmapped:
            lines.append(f"{len(self.unmapped)} ops run whole where the plan splits them:")
            lines += [f"  {line}" for line in self.unmapped]
        return "\n".join(lines) or "nothing split: every rank runs the whole model"

    def unmapped_note(self) -> str:
        """One sentence on the ops run otherwise than the plan ("" where there are none)."""
        if not self.unmapped:
            return ""
        return (f"autopar.apply: {len(self.unmapped)} ops the plan splits outside column/"
                "row-parallel pairs run whole (the same values; more activation memory, an "
                f"all-reduce after each row-parallel projection), e.g. {self.unmapped[0]}; "
                "Styles.explain() lists them")


class _Reading(NamedTuple):
    """What the checks read: the plan, its op mesh's axis names, the tensor and data axes,
    plan FQN -> every name of that tensor in the model, and the problems found so far."""

    plan: object
    axes: list
    tensor_axis: str | None
    data_axis: str | None
    owners: dict
    problems: list


def module_styles(model: nn.Module, plan) -> Styles:
    """The styles :func:`autopar.apply` gives ``model`` for ``plan`` (the module docstring
    says how they follow from it), without a process group.

    Raises PlanError listing every parameter, input or op the plan holds in a way DTensor's
    module styles and FSDP cannot, each with its layout and what to do instead."""
    if plan.stages or "pp" in plan.mesh:
        raise _error([f"the plan runs {max(len(plan.stages), plan.mesh.get('pp', 1))} "
                      "pipeline stages (mesh axis pp): module styles run one stage; plan "
                      f"without stages, {REMEDY}"])
    problems = []
    owners = _owners(model, plan, problems)
    if problems:   # a plan of another model: nothing else it says applies
        raise _error(problems)
    _check_strided(plan, problems)
    r = _Reading(plan, list(plan.op_mesh), *_axes(plan, problems), owners, problems)
    _check_inputs(r)
    canonical = {name: first for first, names in owners.items() for name in names}
    kinds = {path: kind for path, module in model.named_modules()
             if (kind := _module_style(r, path, module, canonical))}
    nodes = _node_modules(plan, model)
    regions = _regions(model, kinds)
    split = {parent for parent, (cols, _) in regions.items()
             if r.tensor_axis and _kept_split(nodes, cols, kinds, r.axes.index(r.tensor_axis))}
    modules = {path: _style(model.get_submodule(path), kind, path.rpartition(".")[0] in split)
               for path, kind in kinds.items()}
    heads = _head_counts(r, model, split)
    unmapped = _check_ops(r, nodes, set(regions) | set(kinds))
    groups = _shard_groups(r, model) if r.data_axis else {}
    if problems:
        raise _error(problems)
    params = {n for n, _ in model.named_parameters()}
    dims = {}
    if r.data_axis:
        d = r.axes.index(r.data_axis)
        dims = {fqn: p.dim for fqn in params if is_shard(p := plan.placements[fqn][d])
                and p.dim != 0}
    tied = tuple(tuple(names) for first, names in owners.items()
                 if len(names) > 1 and first in params)
    return Styles(r.tensor_axis, r.data_axis, modules, heads, groups, dims, tied, unmapped)


def _error(problems: list) -> PlanError:
    return PlanError("autopar.apply cannot express this plan with DTensor's module styles "
                     "and FSDP:\n" + "\n".join(f"  - {p}" for p in problems))


def _owners(model, plan, problems) -> dict:
    """Plan FQN -> every name the model holds that parameter or buffer by (a tied weight
    has several), checking that plan and model name the same tensors."""
    owners = tensor_names(model)
    missing = [n for n, _ in model.named_parameters() if n not in plan.placements]
    if missing:
        problems.append(f"parameters {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
                        " are not in the plan: plan this model, then apply the plan to it")
    stray = [n for n in plan.placements if n not in owners]
    if stray:
        problems.append(f"the plan holds {', '.join(stray[:4])}, which the model does not: "
                        "plan this model, then apply the plan to it")
    return {n: owners[n] for n in plan.placements if n in owners}


def _check_strided(plan, problems) -> None:
    for fqn, stored in plan.placements.items():
        used = [u.layout for u in plan.uses.get(fqn, ())]
        strided = next((lay for lay in (stored, *used) if any(map(is_strided, lay))), None)
        if strided:
            problems.append(
                f"parameter {fqn}: {format_layout(strided)} is a strided split (each rank a "
                "piece of every segment of a fused projection), which no module style "
                "holds: pin a plain split (S(0) for a column-parallel weight; its output is "
                f"then gathered before it is cut), {REMEDY}")


def _axes(plan, problems) -> tuple:
    """(tensor axis, data axis) of the plan: where parameters are used split, and where
    the batch is split or parameters stored split while used whole."""
    axes = list(plan.op_mesh)
    used = {a: [f for f, uses in plan.uses.items()
                if any(is_shard(u.layout[i]) for u in uses)] for i, a in enumerate(axes)}
    tensor = [a for a in axes if used[a]]
    if len(tensor) > 1:
        problems.append(
            f"parameters are used split over {len(tensor)} mesh axes ("
            + "; ".join(f"{a}: {used[a][0]} ..." for a in tensor) + "): module styles take "
            f"one tensor-parallel axis; pin parameters R on all but one, {REMEDY}")
    data = [a for i, a in enumerate(axes) if a not in tensor and (
        any(is_shard(lay[i]) for lay in plan.inputs.values())
        or any(is_shard(lay[i]) for lay in plan.placements.values()))]
    if len(data) > 1:
        problems.append(f"the batch or parameters are split over {len(data)} mesh axes "
                        f"({', '.join(data)}) with parameters used whole: fully_shard takes "
                        f"one data axis here; merge them into one axis, {REMEDY}")
    return (tensor[0] if tensor else None), (data[0] if data else None)


def _check_inputs(r: _Reading) -> None:
    for name, layout in r.plan.inputs.items():
        for axis, p in zip(r.axes, layout):
            if is_shard(p) and not (axis == r.data_axis and _same(p, S0)):
                r.problems.append(
                    f"input {name}: {format_layout(layout)} splits it on dim {p.dim} over "
                    f"{axis}; module styles take inputs whole, or split on dim 0 (the batch) "
                    f"over the data axis: pin {name} R on {axis}, {REMEDY}")


def _family(module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def _module_style(r: _Reading, path, module, canonical) -> str | None:
    """The style ("colwise", "rowwise" or None) of ``module`` on the tensor axis, checking
    every parameter it holds directly against what that style (or no style) holds; of a
    buffer, only its uses (the module keeps it whole on every rank)."""
    own = {n: False for n, _ in module.named_parameters(recurse=False)}
    own.update({n: True for n, _ in module.named_buffers(recurse=False)})
    fqns = {n: canonical.get(f"{path}.{n}" if path else n) for n in own}
    fqns = {n: f for n, f in fqns.items() if f in r.plan.placements}
    family, style = _family(module), None
    if r.tensor_axis and family and "weight" in fqns:
        t = r.axes.index(r.tensor_axis)
        used = {u.layout[t] for u in _uses(r, fqns["weight"], family)}
        style = STYLE_OF.get((family, next(iter(used)))) if len(used) == 1 else None
    held = HELD.get((family, style), {})
    for name, fqn in fqns.items():
        allowed, stored_as = held.get(name, WHOLE)
        for i, axis in enumerate(r.axes):
            _check_held(r, fqn, module, i, allowed if axis == r.tensor_axis else (R, P),
                        None if own[name] else stored_as)
    return style


def _uses(r: _Reading, fqn, family) -> list:
    """The uses of ``fqn`` by a module of ``family``: of a tied parameter, those by that
    family's op (an embedding's lookups, a head's matmuls); else all."""
    uses = r.plan.uses.get(fqn, [])
    if family and len(r.owners.get(fqn, ())) > 1:
        return [u for u in uses if u.op == FAMILY_OP[family]] or uses
    return uses


def _check_held(r: _Reading, fqn, module, i, allowed, stored_as) -> None:
    """One parameter on mesh axis ``i``: used as one of ``allowed``, and stored as
    ``stored_as`` on the tensor axis, whole on other axes but the data axis, where
    fully_shard splits it on any dim (``stored_as`` None: a buffer, whose storage is not
    checked)."""
    axis, family, kind = r.axes[i], _family(module), type(module).__name__
    stored, uses = r.plan.placements[fqn], _uses(r, fqn, _family(module))
    for u in uses:
        p = u.layout[i]
        if any(_same(p, a) for a in allowed) or is_strided(p):
            continue
        if family and is_shard(p) and u.op != FAMILY_OP[family]:
            why = f"read split by {u.op}, not by the {kind}'s own forward"
        else:
            why = f"no DTensor module style holds a {kind}'s {fqn.rpartition('.')[2]} so"
        r.problems.append(f"parameter {fqn}: used {format_layout(u.layout)} "
                          f"({_what(p, axis)}); {why}: pin it R on {axis}, {REMEDY}")
        return
    p = stored[i]
    if stored_as is None or is_strided(p) or axis == r.data_axis:
        return
    if not _same(p, stored_as if axis == r.tensor_axis else R):
        used = " / ".join(sorted({format_layout(u.layout) for u in uses}))
        r.problems.append(f"parameter {fqn}: stored {format_layout(stored)} but used {used}; "
                          f"over {axis} a module style stores a parameter as it uses it: "
                          f"pin its storage as its use, {REMEDY}")


def _same(p, q) -> bool:
    if is_shard(p) or is_shard(q):
        return type(p) is type(q) and p.dim == q.dim
    return (is_partial(p) and is_partial(q)) or (is_replicate(p) and is_replicate(q))


def _what(p, axis) -> str:
    return f"split on dim {p.dim} over {axis}" if is_shard(p) else f"partial over {axis}"


def _node_modules(plan, model) -> list:
    """(node name, node, module FQN) in graph order; an op outside every module of the
    model takes the module of the op before it."""
    known = {path for path, _ in model.named_modules()}
    out, last = [], ""
    for name, node in plan.nodes.items():
        path = node.get("module", "") or ""
        last = path if path in known else last
        out.append((name, node, last))
    return out


def _regions(model, kinds) -> dict:
    """Parent FQN -> (column-parallel, row-parallel) linear children, for parents holding
    both: the regions whose ops may run split between the two."""
    regions = {}
    for path, kind in kinds.items():
        if _family(model.get_submodule(path)) == "linear":
            parent = path.rpartition(".")[0]
            regions.setdefault(parent, ([], []))[kind == "rowwise"].append(path)
    return {p: r for p, r in regions.items() if r[0] and r[1]}


def _kept_split(nodes, colwise, kinds, t) -> bool:
    """Whether the plan keeps every column-parallel output of a region split: the first op
    after each such projection (other projections skipped) reads a split value on axis t."""
    seen = False
    for k, (_, node, path) in enumerate(nodes):
        if path not in colwise or node["op"] != "linear":
            continue
        seen = True
        after = next((n for _, n, p in nodes[k + 1:]
                      if not (n["op"] == "linear" and p in kinds)), None)
        if after is None or not any(is_shard(lay[t]) for lay in after["inputs"]):
            return False
    return seen


def _style(module, kind, kept_split) -> ModuleStyle:
    if _family(module) == "embedding":
        return ModuleStyle(kind, R, R)
    if kind == "colwise":
        return ModuleStyle(kind, R, LOCAL if kept_split else R)
    return ModuleStyle(kind, LOCAL if kept_split else R, R)


def _head_counts(r: _Reading, model, parents) -> dict:
    """Parent FQN -> {head-count attribute: its count per rank}, for the regions kept
    split; a count the axis does not divide is a problem."""
    size, out = r.plan.mesh.get(r.tensor_axis, 1), {}
    for parent in sorted(parents):
        for attr, n in vars(model.get_submodule(parent)).items():
            if attr not in HEAD_COUNTS or not isinstance(n, int) or isinstance(n, bool):
                continue
            if n % size:
                r.problems.append(f"{parent or '(root)'}.{attr} = {n} heads do not split "
                                  f"over {r.tensor_axis} of {size}: pin its projections R on "
                                  f"{r.tensor_axis}, {REMEDY}")
            out.setdefault(parent, {})[attr] = n // size
    return out


def _check_ops(r: _Reading, nodes, styled) -> tuple:
    """The ops the styles run otherwise than the plan, one line each: split over the tensor
    axis outside a styled module or a column/row-parallel region, or over the data axis on
    a dim other than the batch; the styles run them whole (or batch-split), the same values.
    An op split over an axis where neither a parameter nor an input is (context parallel)
    is a problem: the styles would leave that axis repeating one rank's work."""
    other, idle = [], []
    for name, node, path in nodes:
        out = node["output"]
        for axis, p in zip(r.axes, out):
            if not is_shard(p) and not (axis == r.tensor_axis and is_partial(p)):
                continue
            if axis == r.tensor_axis and _within(path, styled):
                continue
            if axis == r.data_axis and _same(p, S0):
                continue
            where = f"in {path}" if path else "at the top level"
            line = f"op {name} ({node['op']} {where}): {format_layout(out)}, {_what(p, axis)}"
            (other if axis in (r.tensor_axis, r.data_axis) else idle).append(line)
            break
    r.problems.extend(f"{line}, where no parameter or input is split (context parallel): "
                      f"the module styles would run it whole on every rank of the axis; "
                      f"{REMEDY}" for line in idle[:_MAX_OP_PROBLEMS])
    if len(idle) > _MAX_OP_PROBLEMS:
        r.problems.append(f"... and {len(idle) - _MAX_OP_PROBLEMS} more ops like these")
    return tuple(other)


def _within(path: str, prefixes) -> bool:
    return any(p == "" or path == p or path.startswith(p + ".") for p in prefixes)


def _shard_groups(r: _Reading, model) -> dict:
    """Module FQN -> reshard_after_forward for fully_shard over the data axis: each repeated
    block, then the root (""); a group reshards where the plan stores one of its parameters
    split. A parameter shared across groups puts its groups into the root's."""
    d = r.axes.index(r.data_axis)
    params = {n for n, _ in model.named_parameters()}

    def group(name: str) -> str:
        block = block_of(name.rpartition(".")[0])
        return block if any(part.isdigit() for part in block.split(".")) else ""

    merged = {group(n) for names in r.owners.values() if len({group(x) for x in names}) > 1
              for n in names}
    groups = {}
    for fqn in r.owners:
        if fqn in params:
            g = "" if group(fqn) in merged else group(fqn)
            groups[g] = groups.get(g, False) or is_shard(r.plan.placements[fqn][d])
    root = groups.pop("", False)
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    return {**{g: groups[g] for g in sorted(groups, key=order.__getitem__)}, "": root}
