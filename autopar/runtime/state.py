"""Sharded state for ``torch.distributed.checkpoint`` (DCP): a planned model's parameters
and buffers and its optimizer's states, keyed by the original model's FQNs, each rank
holding only its own pieces, so that a checkpoint saved under one plan loads under another
(another mesh, world size, recomputation, micro-batch count or set of pipeline stages).

In distributed mode every entry is a DTensor over the module's DeviceMesh whose local tensor
is this rank's piece: a view of the shard itself where the layout is DTensor's own, so that
``dcp.load`` writes straight into the parameter. A strided shard (a fused projection's
query, key and value columns, each split) is no one chunk of the whole tensor, which is what
DCP writes and reads per rank, so it enters the checkpoint gathered on its axis. DCP writes
each piece once (replicas once in all) and reads into each rank what its layout holds,
whichever plan wrote it. In simulated mode, every rank being in this process, the entries
are whole tensors, and a checkpoint moves between the two modes.

The optimizer's entries take the flat form of ``torch.distributed.checkpoint.state_dict``'s
``get_optimizer_state_dict(..., options=StateDictOptions(flatten_optimizer_state_dict=True))``:
``state.<fqn>.<name>`` (a state tensor of the parameter's shape laid out as the parameter)
and ``param_groups.<fqn>.<key>`` (its group's lr, betas, ...). Keyed per parameter, they load
the same however the parameters fall into stages and groups, and a checkpoint those helpers
write for the single-device model loads here, and the reverse.
"""

from __future__ import annotations

import torch

from .._torch import init_optimizer_state
from ..errors import PlanError
from ..program.mesh import Mesh
from ..program.placement import (Partial, Replicate, Shard, format_layout, is_strided,
                                 replicated)


def shard_tensor(full: torch.Tensor, layout, mesh: Mesh, coord) -> torch.Tensor:
    """This coordinate's piece of ``full`` under ``layout`` (outer axis splits first)."""
    t = full
    for a, p in enumerate(layout):
        if is_strided(p):
            t = p.piece(t, mesh.shape[a], coord[a])
        elif isinstance(p, Shard):
            t = t.chunk(mesh.shape[a], p.dim)[coord[a]]
    return t


def checkpoint_layout(layout) -> tuple:
    """The DTensor placements a value of ``layout`` enters a checkpoint in: the layout
    itself, with a strided shard's axis gathered."""
    if any(isinstance(p, Partial) for p in layout):
        raise PlanError(f"layout {format_layout(layout)} holds partial sums, which no "
                        "checkpoint stores: only parameters, buffers and their states are saved")
    return tuple(Replicate() if is_strided(p) else p for p in layout)


def entry(pm, pieces: list, fqn: str, layout, whole: bool = False):
    """The checkpoint entry of a value from every held rank's piece of it in ``layout``;
    with ``whole``, gathered whole on every rank (the one layout in which stages that hold
    copies of a parameter in different layouts write the same chunk)."""
    if pm.simulate:
        return pm._moved(pieces, layout, replicated(len(layout)))[0]
    from torch.distributed.tensor import DTensor
    target = replicated(len(layout)) if whole else checkpoint_layout(layout)
    local = pm._moved(pieces, layout, target)[0]
    shape = pm._full_shapes[fqn]
    return DTensor.from_local(local, pm._device_mesh, target, run_check=False,
                              shape=shape, stride=_contiguous_strides(shape))


def pieces_of(pm, value, fqn: str, layout) -> list:
    """Every held rank's piece in ``layout`` of a checkpoint entry: a DTensor as
    :func:`entry` makes it, or a whole tensor."""
    from torch.distributed.tensor import DTensor
    shape = pm._full_shapes[fqn]
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise PlanError(f"{fqn}: the state dict holds {got} where the model has a tensor of "
                        f"shape {shape}; load a checkpoint of this model")
    if isinstance(value, DTensor):
        target = checkpoint_layout(layout)
        if value.device_mesh == pm._device_mesh and tuple(value.placements) == target:
            return pm._moved([value.to_local()], target, layout)
        value = value.full_tensor()
    return [shard_tensor(value, layout, pm._mesh, c) for c in pm._coords]


def model_state(pm, whole=frozenset()) -> dict:
    """Every parameter and buffer of ``pm`` as a checkpoint entry, under each name the
    model gives it; those named in ``whole`` gathered whole."""
    out = {}
    for name, (fqn, layout) in pm._program.attrs.items():
        out[fqn] = entry(pm, pm._per_rank(name), fqn, layout, fqn in whole)
        for alias in pm._aliases.get(fqn, ()):
            out[alias] = out[fqn]
    return out


def load_model_state(pm, state: dict) -> None:
    """Copy each rank's pieces of ``state``'s entries into ``pm``'s shards."""
    missing = [fqn for fqn, _ in pm._program.attrs.values() if fqn not in state]
    if missing:
        raise PlanError(f"the state dict lacks {_few(missing)}: pass pm.state_dict() loaded "
                        "from a checkpoint of this model (dcp.load(state, checkpoint_id=...))")
    with torch.no_grad():
        for name, (fqn, layout) in pm._program.attrs.items():
            for t, piece in zip(pm._per_rank(name), pieces_of(pm, state[fqn], fqn, layout)):
                if t.data_ptr() != piece.data_ptr() or t.stride() != piece.stride():
                    t.copy_(piece)


def optimizer_state(pm, optimizer, whole=frozenset()) -> dict:
    """``optimizer``'s states and hyperparameters for ``pm``'s parameters, flat and keyed by
    FQN (the states of those named in ``whole`` gathered whole); states it has not made yet
    are made first (as zeros), so that the dict can take a checkpoint's values."""
    init_optimizer_state(optimizer)
    out = {}
    held = _held(pm, optimizer)
    for fqn, (layout, params) in held.items():
        states = [optimizer.state.get(p, {}) for p in params]
        for key, value in states[0].items():
            if _laid_out(value, params[0]):
                value = entry(pm, [s[key] for s in states], fqn, layout, fqn in whole)
            out[f"state.{fqn}.{key}"] = value
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        for fqn, (_, params) in held.items():
            if id(params[0]) in ids:
                out.update({f"param_groups.{fqn}.{k}": v for k, v in group.items()
                            if k != "params"})
    return out


def load_optimizer_state(pm, optimizer, state: dict) -> None:
    """Set ``optimizer``'s states and hyperparameters for ``pm``'s parameters from
    ``state`` (as :func:`optimizer_state` gives it, loaded from a checkpoint)."""
    init_optimizer_state(optimizer)
    held = _held(pm, optimizer)
    with torch.no_grad():
        for fqn, (layout, params) in held.items():
            saved = {k[len(f"state.{fqn}."):]: v for k, v in state.items()
                     if k.startswith(f"state.{fqn}.")}
            states = [optimizer.state[p] for p in params]
            if saved and not states[0]:
                raise PlanError(f"the optimizer has no state for {fqn} to load into, as it has "
                                "gradients but has not stepped: call "
                                "optimizer.zero_grad(set_to_none=True) first")
            for key, current in states[0].items():
                if key not in saved:
                    raise PlanError(f"the optimizer state dict lacks state.{fqn}.{key}: load "
                                    "one saved with the same optimizer")
                value = saved[key]
                if _laid_out(current, params[0]):
                    for s, piece in zip(states, pieces_of(pm, value, fqn, layout)):
                        if s[key].data_ptr() != piece.data_ptr():
                            s[key].copy_(piece)
                elif isinstance(current, torch.Tensor):
                    for s in states:
                        s[key].copy_(torch.as_tensor(value))
                else:
                    for s in states:
                        s[key] = value
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        fqn = next((f for f, (_, ps) in held.items() if id(ps[0]) in ids), None)
        if fqn is None:
            continue
        for k in group:
            if k != "params" and f"param_groups.{fqn}.{k}" in state:
                group[k] = state[f"param_groups.{fqn}.{k}"]


def _held(pm, optimizer) -> dict:
    """FQN -> (layout, every held rank's shard) of ``pm``'s parameters ``optimizer`` steps."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    out, absent = {}, []
    for name, (fqn, layout) in pm._program.attrs.items():
        params = pm._per_rank(name)
        if not isinstance(params[0], torch.nn.Parameter) or not params[0].requires_grad:
            continue
        if all(id(p) in stepped for p in params):
            out[fqn] = (layout, params)
        else:
            absent.append(fqn)
    if not out and absent:
        raise PlanError(f"the optimizer holds none of this module's parameters (such as "
                        f"{_few(absent)}): make it with pm.parameters()")
    return out


def _laid_out(value, param) -> bool:
    """Whether a state value is a tensor laid out as its parameter (not a step count)."""
    return isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0


def _contiguous_strides(shape) -> tuple:
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= size
    return tuple(reversed(strides))


def _few(names: list) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
