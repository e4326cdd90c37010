"""split_micro_batches: rewrite a step into the program of one of its micro-batches.

The example inputs are the global batch; with ``micro_batches=m`` a step runs it as m
micro-batches whose gradients add up before one optimizer step, and the step must equal the
full batch on one device exactly, loss normalisation included.

Splitting the batch over micro-batches in time is splitting it over a mesh axis of size m in
space, so the op rules say how it propagates: every value is split over the batch (``S(d)``,
per-sample), a sum over the batch (``P``, each micro-batch holds a part), or independent of
the batch (``R``). Inputs carry the batch on dim 0 (as a DataLoader stacks it) where their
dim 0 has the batch's size. Where an op admits none of the placements its inputs arrive in,
the cheapest move from the redistribution table is taken:

- ``R -> P``: a batch-independent value added to a batch sum (a loss plus a regularizer of
  the parameters) is kept on the first micro-batch only, so that it counts once per step.
- ``P -> R`` or ``S -> R``, a *reduce point*: the op needs a batch sum (or the batch) whole.
  ``simplify_graph`` turns a token mean into ``sum / count``; the count is a reduce point,
  while the sum stays Partial through the division, so the loss is sum_k S_k / C exactly.
  A reduce point whose value needs no gradient is computed once per step from the full
  inputs, before the micro-batches (:attr:`MicroBatches.whole`), and fed to every
  micro-batch's program as an extra input. One on a value that needs a gradient (``loss **
  2``) cannot be split: gradients of a function of the whole batch do not add up over its
  parts, and :class:`~autopar.errors.PlanError` says so.

:func:`split_micro_batches` rewrites the captured graph into the program of one micro-batch
(its sizes, the reduce points as inputs), which is then planned like any program; outputs of
the micro-batches combine by their placement: sums add up, split values concatenate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx import Node

from autopar.errors import PlanError
from autopar.program.graph import where, write_buffer
from autopar.program.placement import Partial, Replicate, Shard, is_partial, is_replicate, is_shard
from autopar.rules import candidates, even_combos, is_tensor_like, shape_of, tensor_inputs
from autopar.rules.names import canonical_name
from autopar.search.microbatch import divisors

from .annotate_shapes import annotate_shapes

R, P = Replicate(), Partial()

# what a move costs the analysis: a reduce point costs a pass over the full inputs per step,
# a value needed whole that requires grad or a slice of a batch-independent value cannot run
_FIRST_COST, _WHOLE_COST, _REFUSED_COST = 1, 10, 10_000

FIRST_FLAG = "first_micro_batch"


@dataclass
class BatchSplit:
    """What :func:`split_over_batch` found: a placement per value over the micro-batches and
    the moves the ops need between them."""

    micro_batches: int
    batch_size: int
    input_dims: dict                                  # placeholder -> dim carrying the batch
    placements: dict = field(default_factory=dict)    # node -> S(d) | R | P
    chosen: dict = field(default_factory=dict)        # node -> (inputs' placements, output, spec)
    whole: dict = field(default_factory=dict)         # node needed whole -> its readers
    derived: set = field(default_factory=set)         # batch-independent values computed
                                                      #   from ones needed whole
    sliced: dict = field(default_factory=dict)        # of those, read split: node -> dim
    first: list = field(default_factory=list)         # (value, reader): R -> P
    refused: list = field(default_factory=list)       # (value, reader, why)
    wanted: list = field(default_factory=list)        # (value, dim): batch-independent
                                                      #   values read split on dim


@dataclass
class MicroBatches:
    """How a step runs as micro-batches: the split of each input, the program of the values
    needed whole, and how outputs combine. Held by the ParallelModule."""

    count: int
    batch_size: int
    input_dims: list              # per user input (flat): the dim carrying the batch, or None
    full_shapes: list             # per user input: (name, shape, dtype), as planned
    whole: fx.GraphModule | None  # full inputs -> the reduce points' values
    first_flag: bool              # the program takes FIRST_FLAG as its last input
    outputs: list                 # per graph output: ("sum",) | ("cat", dim) | ("first",)
    whole_dims: list = field(default_factory=list)   # per value needed whole: the dim a
                                                     #   micro-batch reads its slice of, or None

    def program_inputs(self, inputs: list) -> list:
        """The inputs of each micro-batch's program: its slice of the batch, then the values
        needed whole (computed here, from the full inputs; its slice where it is read split),
        then the first-micro-batch flag."""
        whole = []
        if self.whole is not None:
            with torch.no_grad():
                whole = list(self.whole(*inputs))
        out = []
        for k in range(self.count):
            mine = [x if d is None else x.chunk(self.count, d)[k]
                    for x, d in zip(inputs, self.input_dims)]
            flag = [torch.tensor(k == 0, device=_device(inputs))] if self.first_flag else []
            dims = self.whole_dims or [None] * len(whole)
            read = [w if d is None else w.chunk(self.count, d)[k] for w, d in zip(whole, dims)]
            out.append(mine + read + flag)
        return out

    def combine(self, per_micro: list) -> list:
        """The full batch's outputs from each micro-batch's (lists of graph outputs)."""
        out = []
        for i, how in enumerate(self.outputs):
            parts = [outs[i] for outs in per_micro]
            if how[0] == "sum":
                out.append(sum(parts[1:], parts[0]))
            elif how[0] == "cat":
                out.append(torch.cat(parts, how[1]))
            else:
                out.append(parts[0])
        return out


def _device(inputs):
    return next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)


# -- analysis ----------------------------------------------------------------------------------

def split_over_batch(gm: fx.GraphModule, micro_batches: int, input_names=()) -> BatchSplit:
    """How ``gm`` (annotated at the full batch) splits into ``micro_batches`` along its batch:
    a placement per value, from the op rules, and the moves between them.

    A value computed from shapes alone (a token-type or position table expanded to the
    batch) is independent of the batch, and where an op reads it split over the batch it is
    recomputed at a micro-batch's size instead: the analysis runs again with that value asked
    to be split, which asks the same of its own inputs on the next run, back to where the
    batch's size enters (an ``expand``'s broadcast dim). Rows along a broadcast dim are
    equal, so any micro-batch's slice is every micro-batch's. Where that does not end in a
    program without refusals, the first analysis's refusals are what the error names."""
    hints, first = {}, None
    for _ in range(len(gm.graph.nodes) + 1):
        split = _analyse(gm, micro_batches, list(input_names), hints)
        first = first or split
        asked = {src: dim for src, dim in split.wanted if src not in hints}
        if not split.refused or not asked:
            break
        hints.update(asked)
    return split if not split.refused else first


def _analyse(gm, micro_batches: int, input_names: list, hints: dict) -> BatchSplit:
    split = _batch_inputs(gm, micro_batches, input_names)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            d = split.input_dims.get(node)
            split.placements[node] = R if d is None else Shard(d)
        elif node.op in ("call_function", "call_method"):
            if node.target is write_buffer:
                split.refused.append((node.args[0], node, "writes a buffer, once a step on one "
                                      "device but once a micro-batch here"))
            _place(node, split, hints.get(node))
            if is_replicate(split.placements[node]) and any(
                    a in split.whole or a in split.derived for a in tensor_inputs(node)):
                split.derived.add(node)
        elif node.op != "output":
            split.placements[node] = R
    return split


def _batch_inputs(gm, m: int, names: list) -> BatchSplit:
    """The batch's size (dim 0 of the first input that has dims) and the inputs carrying it,
    checked to split into ``m`` equal micro-batches."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    shaped = [n for n in placeholders
              if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() > 0]
    if not shaped:
        raise PlanError(f"micro_batches={m}: no input has a batch dim to split (inputs "
                        f"{names or [n.name for n in placeholders]}); use micro_batches=1")
    first = shaped[0]
    batch = int(first.meta["val"].shape[0])
    if batch % m:
        name = names[placeholders.index(first)] if len(names) == len(placeholders) \
            else first.name
        raise PlanError(f"micro_batches={m} does not divide the batch of {batch} (dim 0 of "
                        f"input {name!r}); choose one of its divisors {divisors(batch)}, or give "
                        f"a batch that {m} divides")
    dims = {n: 0 for n in shaped if int(n.meta["val"].shape[0]) == batch}
    return BatchSplit(m, batch, dims)


def _place(node: Node, split: BatchSplit, hint: int | None = None) -> None:
    """The cheapest option of ``node``'s rule for the placements its inputs arrive in; one
    whose output is split on dim ``hint``, where one is asked and the rule has it."""
    if not is_tensor_like(node.meta.get("val")):
        split.placements[node] = R
        return
    ins = tensor_inputs(node)
    have = [split.placements[a] for a in ins]
    found = candidates(node)
    spec, columns, _ = found
    best = None
    options = [i for (i,) in even_combos(found, (split.micro_batches,))]
    if hint is not None and any(columns[i][-1] == Shard(hint) for i in options):
        options = [i for i in options if columns[i][-1] == Shard(hint)]
    for i in options:
        *need, out = columns[i]
        cost = sum(_move_cost(a, h, n, split) for a, h, n in zip(ins, have, need))
        key = (cost, not is_replicate(out))   # ties: independent of the batch where it can be
        if best is None or key < best[0]:
            best = (key, tuple(need), out)
    if best is None:  # no option splits evenly: the op runs on the whole batch
        best = (None, (R,) * len(ins), R)
    _, need, out = best
    split.chosen[node] = (need, out, spec)
    split.placements[node] = out
    for a, h, n in zip(ins, have, need):
        _record_move(a, node, h, n, split)


def _move_cost(src: Node, have, need, split: BatchSplit) -> int:
    if have == need:
        return 0
    if is_replicate(have):
        if is_partial(need):
            return _FIRST_COST
        return _WHOLE_COST if _sliceable(src, need, split) else _REFUSED_COST
    refused = _REFUSED_COST if _requires_grad(src) else 0
    return _WHOLE_COST + refused + _move_cost(src, R, need, split)


def _sliceable(src: Node, need, split: BatchSplit) -> bool:
    """Whether a micro-batch may read its slice of ``src``, computed whole: a value made from
    values needed whole (an attention mask built from the full batch's padding mask), whose
    dim ``need.dim`` is the batch's. Each micro-batch reads the rows of its own samples."""
    return src in split.derived and is_shard(need) and \
        shape_of(src)[need.dim] == split.batch_size


def _record_move(src: Node, reader: Node, have, need, split: BatchSplit) -> None:
    if have == need:
        return
    if not is_replicate(have):
        if _requires_grad(src):
            split.refused.append((src, reader, f"needs {src.name} ({_what(have)}) whole, and it "
                                  "requires grad: gradients of a function of the whole "
                                  "batch do not add up over micro-batches"))
            return
        split.whole.setdefault(src, []).append(reader)
    if is_partial(need):
        split.first.append((src, reader))
    elif _sliceable(src, need, split):
        split.whole.setdefault(src, []).append(reader)
        split.sliced[src] = need.dim
    elif is_shard(need):
        if is_replicate(have) and src.op in ("call_function", "call_method"):
            split.wanted.append((src, need.dim))
        held = "does not depend on the batch" if is_replicate(have) else f"is {_what(have)}"
        split.refused.append((src, reader, f"reads {src.name} split over the batch on dim "
                              f"{need.dim}, but {src.name} {held}: a micro-batch's slice of "
                              "it is not supported"))


def _requires_grad(node: Node) -> bool:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in vals)


def _what(placement) -> str:
    return "a sum over the batch" if is_partial(placement) else \
        f"split over the batch on dim {placement.dim}"


def check_splittable(split: BatchSplit) -> None:
    """Raise one PlanError naming every op that keeps the step from splitting."""
    if not split.refused:
        return
    lines = []
    for src, reader, why in split.refused:
        path, loc = where(reader)
        lines.append(f"  {reader.name} ({reader.meta.get('autopar.op', reader.target)}, "
                     f"{path} {loc}) {why}")
    raise PlanError(f"micro_batches={split.micro_batches}: the step does not split into "
                    f"micro-batches exactly:\n" + "\n".join(lines) +
                    "\nmicro_batches=1 runs it (the whole batch at once)")


# -- the program of one micro-batch ------------------------------------------------------------

def split_micro_batches(gm, ctx):
    """Rewrite the full-batch program into the program of one micro-batch.

    Reads ``ctx.options.micro_batches`` and ``node.meta["val"]``, ``"autopar.op"``; rewrites
    the sizes of split values to a micro-batch's, reads each reduce point from a new input,
    keeps batch-independent values added to batch sums on the first micro-batch, extends
    ``ctx.example_inputs`` and ``ctx.input_names`` with the new inputs, annotates the graph
    again at the micro-batch's shapes and sets ``ctx.micro`` (:class:`MicroBatches`).
    Nothing changes where ``micro_batches`` is 1 or not given.
    """
    m = ctx.options.micro_batches
    ctx.micro = None
    if not m or m == 1:
        return gm
    split = split_over_batch(gm, m, ctx.input_names)
    check_splittable(split)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    whole = _whole_program(gm, placeholders, list(split.whole))
    full_shapes = [(name, tuple(x.shape), x.dtype)
                   for name, x in zip(ctx.input_names, ctx.example_inputs)]
    outputs = _output_combination(gm, split)
    _resize_split_values(split)
    extra, extra_names = _read_whole_values(gm, split, placeholders)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    ctx.example_inputs = [x if split.input_dims.get(n) is None
                          else x.narrow(split.input_dims[n], 0, split.batch_size // m)
                          for n, x in zip(placeholders, ctx.example_inputs)] + extra
    ctx.input_names = list(ctx.input_names) + extra_names
    annotate_shapes(gm, ctx)
    ctx.micro = MicroBatches(m, split.batch_size, [split.input_dims.get(n) for n in placeholders],
                             full_shapes, whole, bool(split.first), outputs,
                             [split.sliced.get(v) for v in split.whole])
    return gm


def _output_combination(gm, split: BatchSplit) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    how = []
    for v in out.args[0]:
        p = split.placements.get(v, R) if isinstance(v, Node) else R
        how.append(("sum",) if is_partial(p) else ("cat", p.dim) if is_shard(p) else ("first",))
    return how


def _whole_program(gm, placeholders: list, values: list) -> fx.GraphModule | None:
    """A program of the full inputs computing ``values`` (the reduce points), on one device."""
    if not values:
        return None
    needed, todo = set(), list(values)
    while todo:
        n = todo.pop()
        if n in needed:
            continue
        if n.op == "get_attr":
            reader = next(u for u in n.users if u in needed or u in values)
            raise PlanError(f"the whole-batch value {values[0].name} (a reduce point of the "
                            f"micro-batches) reads the model's {n.target!r} through "
                            f"{reader.name}: it is computed from the inputs alone, before the "
                            "micro-batches; use micro_batches=1")
        needed.add(n)
        todo.extend(a for a in n.all_input_nodes)
    g, env = fx.Graph(), {}
    for p in placeholders:
        env[p] = g.placeholder(p.name)
    for n in gm.graph.nodes:
        if n in needed and n.op != "placeholder":
            env[n] = g.node_copy(n, env.__getitem__)
    g.output(tuple(env[v] for v in values))
    return fx.GraphModule(torch.nn.Module(), g, "WholeBatchValues")


def _read_whole_values(gm, split: BatchSplit, placeholders: list) -> tuple:
    """New inputs for the values needed whole (and the first-micro-batch flag), read by the
    ops that need them; returns their example values and names."""
    graph = gm.graph
    examples, names, whole_of = [], [], {}
    with graph.inserting_after(placeholders[-1]):
        flag = graph.placeholder(FIRST_FLAG) if split.first else None
    for src in reversed(list(split.whole)):  # inserted after the inputs, so in reverse
        with graph.inserting_after(placeholders[-1]):
            whole_of[src] = graph.placeholder(f"{src.name}_whole")
    for src, readers in split.whole.items():
        d = split.sliced.get(src)
        val = src.meta["val"]
        examples.append(val if d is None else val.narrow(d, 0, split.batch_size //
                                                          split.micro_batches))
        names.append(whole_of[src].name)
        for reader in readers:
            reader.replace_input_with(src, whole_of[src])
    for src, reader in split.first:
        value = whole_of.get(src, src)
        kept = _insert_before(reader, torch.where, (flag, value, 0))
        reader.replace_input_with(value, kept)
    if flag is not None:
        examples.append(torch.tensor(True))
        names.append(flag.name)
    return examples, names


def _insert_before(reader: Node, target, args) -> Node:
    with reader.graph.inserting_before(reader):
        n = reader.graph.call_function(target, args)
    n.meta["autopar.op"] = canonical_name(n)
    for key in ("nn_module_stack", "autopar.module_path", "autopar.source"):
        if key in reader.meta:
            n.meta[key] = reader.meta[key]
    return n


def _resize_split_values(split: BatchSplit) -> None:
    """Sizes written into the ops of split values (view, reshape, expand) become a
    micro-batch's, through each rule's own rewrite, as codegen does for a rank's shard."""
    m = split.micro_batches
    for node, (_, out, spec) in split.chosen.items():
        if not is_shard(out) or spec.rewrite is None:
            continue
        shape = list(shape_of(node))
        shape[out.dim] //= m
        args, kwargs = spec.rewrite(node.args, node.kwargs, tuple(shape))
        node.args, node.kwargs = tuple(args), dict(kwargs)
