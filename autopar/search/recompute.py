"""Activation recomputation: per block, what stays saved for backward and what is computed
again.

A block is one instance of a repeated block (a transformer layer, ``h.3``), as
:func:`autopar.passes.fold_repeated_blocks` finds them. Each takes one of three choices:

``none``       every op saves what its backward needs (the default).
``selective``  the block's matmul-like ops keep their outputs; every other op (norms,
               pointwise, softmax, dropout) is computed again in backward from them.
               Megatron-LM's selective recomputation (Korthikanti et al., 2022) drops the
               attention core's saved activations this way for a few percent more FLOPs.
``full``       only the block's inputs stay saved; its whole forward runs again in
               backward (about one more forward pass, 33% more FLOPs).

The rank program applies a choice with ``torch.utils.checkpoint.checkpoint(...,
use_reentrant=False)``, a selective one with a policy from
``create_selective_checkpoint_contexts``. This module holds what a choice means (which ops a
selective block keeps) and the user's pins; :mod:`autopar.search.meshes` weighs the choices.
"""

from __future__ import annotations

import copy
import fnmatch

import numpy as np

from ..errors import PlanError, closest
from ..rules.traits import CONTRACTIONS, KEPT_BY_SELECTIVE


def block_paths(blocks) -> list:
    """The module path of every block instance, in graph order."""
    return [inst.path for cls in blocks for inst in cls.instances]


def resolve_recompute(request, paths) -> dict:
    """``request`` (glob over block paths -> choice, or one choice for every block, as
    :class:`~autopar.options.Options` checked it) as block path -> choice, for the blocks it
    names."""
    if request is None:
        return {}
    if isinstance(request, str):
        request = {"*": request}
    out = {}
    for pattern, choice in request.items():
        matched = [p for p in paths if fnmatch.fnmatchcase(p, pattern)]
        if not matched:
            raise PlanError(f"recompute pattern {pattern!r} matches no block; the blocks are "
                            f"{_some(paths)} (closest: {closest(pattern.replace('*', ''), paths)})")
        for p in matched:
            out[p] = choice
    return out


def _some(paths, n: int = 4) -> str:
    if not paths:
        return "none (the program has no repeated blocks)"
    shown = ", ".join(repr(p) for p in paths[:n])
    return shown + (f" ... ({len(paths)} in all)" if len(paths) > n else "")


# -- pricing a choice in a planning problem ---------------------------------------------------


class Recompute:
    """Recompute choices per block instance, applied to the tables of a planning problem
    (:class:`~autopar.search.problem.Problem`) before it is solved, so that the placements are
    chosen knowing what stays saved and what is computed twice.

    In a folded problem a node stands for a run of instances; where they take different
    choices, its tables are the mean over the run (memory and seconds are linear in them,
    so the run's total is exact). Per instance:

    - saved bytes: ``none`` as priced; ``selective`` the outputs of the ops
      :data:`~autopar.rules.traits.KEPT_BY_SELECTIVE` names, ``full`` nothing, and either also the block's
      inputs from the chain of blocks (a checkpoint keeps its arguments);
    - seconds: plus the forward of what is computed again (``full``: every op and the
      forward collectives on the edges into them; ``selective``: the ops not kept, no
      collective);
    - transient: in backward a recomputed block holds its activations again for a while,
      counted once per class at the end of the forward pass (where memory peaks).
    """

    def __init__(self, choices: dict, blocks):
        self.choices, self.blocks = dict(choices), blocks

    def __bool__(self) -> bool:
        return any(c != "none" for c in self.choices.values())

    def apply(self, prob, facts):
        """``prob`` with its tables for these choices (a shallow copy; ``prob`` is left
        alone, its tables are shared with other problems)."""
        if not self:
            return prob
        new = copy.copy(prob)
        for table in ("node_s", "saved_bytes", "transient_bytes"):
            setattr(new, table, dict(getattr(prob, table)))
        new.edges, new.held = list(prob.edges), list(prob.held)
        counted = set()   # block inputs a checkpoint keeps, counted once
        for cls in self.blocks:
            runs = _runs(prob, cls)
            last = _last_recomputed(runs, self.choices)
            for i, run in enumerate(runs):
                picked = [self.choices.get(inst.path, "none") for inst in run]
                if any(c != "none" for c in picked):
                    _price_run(new, facts, run, picked, i == last, counted)
        return new


def _runs(prob, cls) -> list:
    """The instances of ``cls`` grouped by the instance standing for them in ``prob``."""
    runs = {}
    for inst in cls.instances:
        head = prob.rep.get(inst.nodes[0], inst.nodes[0])
        runs.setdefault(head, []).append(inst)
    return list(runs.values())


def _last_recomputed(runs, choices) -> int:
    """The run holding the last instance recomputed: its backward comes first."""
    last = -1
    for i, run in enumerate(runs):
        if any(choices.get(inst.path, "none") != "none" for inst in run):
            last = i
    return last


def _shares(choices: list) -> dict:
    out = {}
    for c in choices:
        out[c] = out.get(c, 0.0) + 1.0 / len(choices)
    return out


def _price_run(prob, facts, run: list, picked: list, transient: bool, counted: set):
    """Rewrite the tables of the nodes standing for ``run`` (instances of one block, the
    first in the problem) for the choices ``picked`` for them."""
    inst, shares = run[0], _shares(picked)
    calls = [n for n in inst.nodes if n.op in ("call_function", "call_method")]
    kept_inputs = _run_input_bytes(prob, facts, run, calls, counted)
    last = next(c for c in reversed(picked) if c != "none")   # its backward comes first
    for n in calls:
        op = n.meta["autopar.op"]
        none_saved = np.asarray(prob.saved_bytes[n], dtype=float)
        forward_s = np.asarray(prob.node_s[n], dtype=float) / (1 + _backward_factor(op))
        saved = shares.get("none", 0.0) * none_saved
        seconds = np.asarray(prob.node_s[n], dtype=float)
        for choice in ("selective", "full"):
            f = shares.get(choice, 0.0)
            if not f:
                continue
            keeps = choice == "selective" and op in KEPT_BY_SELECTIVE
            mine = np.asarray(prob.out_bytes[n], dtype=float) if keeps else 0.0
            mine = mine + kept_inputs.get(n, 0.0)
            saved = saved + f * mine
            if not keeps:
                seconds = seconds + f * forward_s
            if transient and choice == last:
                prob.transient_bytes[n] = np.broadcast_to(
                    np.maximum(none_saved - mine, 0.0), (len(prob.options[n]),)).tolist()
        prob.saved_bytes[n] = np.broadcast_to(saved, (len(prob.options[n]),)).tolist()
        prob.node_s[n] = seconds.tolist()
    _saved_copies(prob, facts, run, picked)
    _recompute_moves(prob, facts, run, picked)
    if transient:
        from .problem import _ALWAYS, Held
        end = len(prob.nodes) - 1
        prob.held += [Held(n, "transient_bytes", end, _ALWAYS, 1) for n in calls
                      if n in prob.transient_bytes]


def _choices_per_edge(prob, facts, run: list, picked: list) -> dict:
    """Per edge of the problem (src, dst, slot), how many of the program edges it stands
    for lead into an instance of ``run`` taking each choice of ``picked``."""
    rep, out = prob.rep, {}
    for inst, choice in zip(run, picked):
        for n in inst.nodes:
            if n.op in ("call_function", "call_method"):
                for slot, src in enumerate(facts.of(n)[0]):
                    count = out.setdefault((rep.get(src, src), rep.get(n, n), slot), {})
                    count[choice] = count.get(choice, 0) + 1
    return out


def _saved_copies(prob, facts, run: list, picked: list):
    """What stays saved of the copies collectives make on the edges into the ops of
    recomputed instances: a selective block keeps every collective's output, so that
    backward runs none again; a full block keeps none (its forward makes them again in
    backward). Each edge of the problem keeps them for the share of the program edges it
    stands for that lead into an instance keeping them."""
    from .problem import edge_spans
    keeping, pos = _choices_per_edge(prob, facts, run, picked), None
    for i, e in enumerate(prob.edges):
        count = keeping.get((e.src, e.dst, e.slot))
        if count is None:
            continue
        src_bytes, _, floating = facts.of(e.src)[1:4]
        if e.saved_bytes:      # a parameter's copy: kept by "none" and "selective"
            kept = e.saved_bytes * (count.get("none", 0) + count.get("selective", 0)) / \
                e.weight
        elif count.get("selective") and floating and e.src.op != "get_attr":
            kept = count["selective"] / e.weight * src_bytes * prob.model.activation_scale * \
                facts.saved.share(e.src)
        else:
            continue
        e = prob.edges[i] = copy.copy(e)   # (keeps its distinct keys)
        e.__dict__.pop("_saved", None)
        e.saved_bytes = kept
        if not e.spans:
            pos = pos or prob.index()
            e.spans = edge_spans(prob, e, pos)


def _recompute_moves(prob, facts, run: list, picked: list):
    """The edges into the ops of fully recomputed instances move their values again: each
    edge of the problem pays its forward collectives once more for the share of the program
    edges it stands for that lead into such an instance."""
    choices = _choices_per_edge(prob, facts, run, picked)
    for i, e in enumerate(prob.edges):
        count = choices.get((e.src, e.dst, e.slot), {}).get("full")
        if count:
            e = prob.edges[i] = copy.copy(e)   # (keeps its distinct keys)
            e.cost = _PlusForward(e.cost, prob.prices, count / e.weight)


def _run_input_bytes(prob, facts, run: list, calls: list, counted: set) -> dict:
    """:func:`_chain_input_bytes` of each instance of ``run``, by the reader standing for
    its own (in ``calls``), the mean over the run: instances read different values (the
    first of a chain the model's input, the others the block before), of different sizes."""
    out = {}
    for other in run:
        same = dict(zip(other.nodes, run[0].nodes))
        mine = [m for m in other.nodes if m.op in ("call_function", "call_method")]
        for n, v in _chain_input_bytes(prob, facts, other, mine, counted).items():
            out[same[n]] = out.get(same[n], 0.0) + v / len(run)
    return {n: v for n, v in out.items() if n in calls}


def _chain_input_bytes(prob, facts, inst, calls, counted: set) -> dict:
    """Per reader inside ``inst``: the bytes (per strategy) of the block inputs it reads
    first that a checkpoint keeps for the instance (every tensor but the parameters), in
    the layout that reader needs them; a value that ``counted`` holds (read by a block
    before, as a padding mask or an input two single-layer blocks share) once only."""
    first_reader = {}
    inside = set(inst.nodes)
    for n in calls:
        for slot, src in enumerate(facts.of(n)[0]):
            if src not in inside and src not in first_reader and src not in counted and \
                    src.op != "get_attr" and facts.of(src)[1]:
                first_reader[src] = (n, slot)
    counted.update(first_reader)
    out = {}
    share = prob.prices.fractions()
    for src, (n, slot) in first_reader.items():
        _, needs = prob.prices.id_arrays(prob.options[prob.rep.get(n, n)])
        # (a view, an expanded mask, keeps the storage it views)
        num_bytes = min(facts.of(src)[1], facts.of(facts.saved.root(src))[1]) * \
            prob.model.activation_scale
        out[n] = out.get(n, 0.0) + num_bytes * share[needs[:, slot]]
    return out


def _backward_factor(op: str) -> float:
    from ..cost.model import BACKWARD_FACTOR_CONTRACTION, BACKWARD_FACTOR_OTHER
    return BACKWARD_FACTOR_CONTRACTION if op in CONTRACTIONS else BACKWARD_FACTOR_OTHER


class _PlusForward:
    """An edge's costs plus ``share`` times its forward collectives again (the edge into an
    op recomputed in backward moves its value again; gradient sums do not repeat)."""

    def __init__(self, priced, prices, share: float):
        self.priced, self.prices, self.share = priced, prices, share
        self.forbids = priced.forbids
        self.num_bytes, self.grad, self.param = priced.num_bytes, priced.grad, priced.param

    def __getitem__(self, key) -> float:
        a, (need, _) = key
        return self.priced[key] + self.share * float(self._forward((a,), ((need, ()),))[0, 0])

    def matrix(self, src_keys: list, dst_keys: list) -> np.ndarray:
        return self.priced.matrix(src_keys, dst_keys) + self.share * self._forward(
            tuple(src_keys), tuple(dst_keys))

    def _forward(self, srcs: tuple, dsts: tuple) -> np.ndarray:
        paths, _ = self.prices.moves.block(srcs, tuple((need, ()) for need, _ in dsts))
        fixed, per_byte = self.prices.path_lines(False)
        return fixed[paths] + per_byte[paths] * self.num_bytes


# -- the search ---------------------------------------------------------------------------------

# A plan whose peak memory is within this share of the budget is taken to be bound by it:
# recomputation may then buy a faster placement, and is tried.
BINDS = 0.95
# Where recomputing every free block fits, the share of them recomputed is cut in halves this
# many times on the chosen mesh (the rest take the next cheaper choice), while it still fits.
MIX_STEPS = 1


def choose_recompute(plan_with, blocks, pins: dict, budget: float):
    """The fastest plan over recompute choices: ``plan_with(recompute, mesh=None,
    refine_bound=True)`` plans a :class:`~autopar.search.result.Planned` for a
    :class:`Recompute` (on one mesh where given; see
    :func:`~autopar.search.meshes.choose_plan` for ``refine_bound``) or raises PlanError.
    Returns the fastest, with its choice per block path.

    Only where memory binds: no recomputation first (pinned blocks keep their pins); where
    that plan is within :data:`BINDS` of the budget or none fits, every free block selective,
    then full; the fastest that fits is refined by recomputing fewer blocks on its mesh.
    Plans that memory binds are compared unrefined (their refinements are the costliest
    programs of all), and only the one kept is refined, on its mesh."""
    from ..errors import NoFit, PlanError
    paths = block_paths(blocks)
    free = [p for p in paths if p not in pins]

    def config(choice, strong=None, count=0):
        chosen = {p: choice for p in free}
        if strong is not None:
            chosen.update({p: strong for p in free[:count]})
        return {p: pins.get(p, chosen.get(p, "none")) for p in paths}

    tried, error = [], None

    def attempt(choices, mesh=None, refine=False):
        nonlocal error
        try:
            found = plan_with(Recompute(choices, blocks), mesh, refine)
        except PlanError as e:
            if mesh is None:
                error = e if not error or "full" in choices.values() else error
            return None
        tried.append((found.cost.total_s, len(tried), found, choices))
        return found

    base = attempt(config("none"), refine=not free)
    if not free or base is not None and base.cost.memory_bytes_per_device < BINDS * budget:
        if base is None:
            raise error
        return base._replace(recompute=config("none"))
    weaker = "none"
    for choice in ("selective", "full"):
        if attempt(config(choice)) is not None:
            break   # a choice that fits: a stronger one only costs more time
        weaker = choice
    if not tried:
        if not isinstance(error, NoFit):
            raise error
        raise error.having_tried("every block" + (" not pinned" if pins else "") +
                                 " recomputed in full") from None
    _, _, found, choices = min(tried)
    strong = next((c for c in ("full", "selective") if c in choices.values()), None)
    if strong is not None and strong != weaker and len(free) > 1:
        _mix(attempt, found, config, weaker, strong, len(free))
    _, _, found, choices = min(tried)
    if found.cost.memory_bytes_per_device >= BINDS * budget:
        attempt(choices, found.mesh.as_dict(), refine=True)
        _, _, found, choices = min(tried)
    return found._replace(recompute=choices)


def _mix(attempt, found, config, weaker, strong, n_free: int):
    """Recompute ``strong`` on fewer of the free blocks (the first ones), the others taking
    ``weaker``, on the mesh of ``found``: halving the count while a plan still fits."""
    mesh = found.mesh.as_dict()
    low, high = 0, n_free          # high: a count known to fit
    for _ in range(MIX_STEPS):
        mid = (low + high) // 2
        if mid in (low, high):
            break
        if attempt(config(weaker, strong, mid), mesh) is not None:
            high = mid
        else:
            low = mid
