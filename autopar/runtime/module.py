"""ParallelModule: this rank's parameter shards and the rewritten program, as an nn.Module.

In simulated mode it holds every rank's shards and runs all ranks together; in distributed
mode (one process per rank under torchrun) it holds this rank's shards and runs collectives
over a DeviceMesh. Its ``parameters()`` are the local shards, so any torch.optim optimizer
works unchanged. In distributed mode its ranks first check that they planned alike, and a
rank that fails is named by the others instead of leaving them waiting
(:mod:`autopar.runtime.faults`).

A plan of m > 1 micro-batches runs the program of one micro-batch m times per step
(:mod:`autopar.search.microbatch`): ``step`` runs each micro-batch's forward and backward in turn,
freeing its activations before the next, with one gradient sum per bucket per step, and
runs a program of the loss alone (the other outputs are not gathered for anyone);
calling the module runs them all and returns the full batch's outputs, whose ``backward()``
gives the same gradients but holds every micro-batch's activations until then.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
import torch.fx as fx

from ..errors import InputError, PlanError
from ..program.graph import loss_index, loss_only
from ..program.mesh import Mesh
from ..program.placement import replicated
from ..program.redistribute import plan_steps
from . import collectives as C
from . import faults, state
from .grad_sync import DistributedGradSync, SimulatedGradSync
from .simulate import run_collective, run_replicated
from .state import shard_tensor


class ParallelModule(torch.nn.Module):
    """The distributed program of one planned model (see :func:`autopar.compile`)."""

    def __init__(self, captured, plan, program, source, simulate: bool, micro=None,
                 device_mesh=None):
        """``device_mesh``: in distributed mode, the mesh of this program's ranks where it
        is not the whole world (a pipeline stage's); the world's by default."""
        super().__init__()
        self.plan = plan
        self.simulate = simulate
        self._micro = micro  # autopar.passes.split_micro_batches.MicroBatches, None for one micro-batch
        self._captured = captured
        self._program = program
        self._mesh = program.mesh
        self._fqn_of = {name: fqn for name, (fqn, _) in program.attrs.items()}
        self._full_shapes = {fqn: tuple(source[fqn].shape) for fqn, _ in program.attrs.values()}
        # other names the model gives a planned tensor (a tied weight: lm_head.weight)
        planned = {id(source[fqn]): fqn for fqn, _ in program.attrs.values() if fqn in source}
        self._aliases = {}
        for fqn, t in source.items():
            first = planned.get(id(t))
            if first is not None and first != fqn:
                self._aliases.setdefault(first, []).append(fqn)
        if simulate:
            self._coords = [self._mesh.coordinate(r) for r in range(self._mesh.size)]
            self.ranks = torch.nn.ModuleList(
                self._build(source, c) for c in self._coords)
            self._device_mesh = None
            self._epoch = None  # failures are recorded for other ranks in distributed mode
        else:
            self._device_mesh = device_mesh if device_mesh is not None else \
                _init_distributed(plan, self._mesh)
            self._epoch = faults.current_epoch()  # its plan check's
            coord = tuple(self._device_mesh.get_coordinate())
            self._coords = [coord]
            self.program = self._build(source, coord, device=_device_of(self._device_mesh))
        self._grad_sync = self._gradient_sync()
        out = next(n for n in captured.gm.graph.nodes if n.op == "output")
        self._loss = loss_index(list(out.args[0]))
        self._steps = None   # the programs step() runs: the loss alone (loss_only)

    def _gradient_sync(self):
        """Bucketed gradient sums of the parameters whose every use sums over the same axes."""
        sync = self._program.grad_sync
        if not sync:
            return None
        if self.simulate:
            return SimulatedGradSync({n: ([getattr(r, n) for r in self.ranks], axes)
                                      for n, axes in sync.items()}, self._mesh)
        return DistributedGradSync({n: (getattr(self.program, n), axes)
                                    for n, axes in sync.items()}, self._device_mesh)

    # -- construction ---------------------------------------------------------------------------

    def _build(self, source, coord, device=None) -> fx.GraphModule:
        root = torch.nn.Module()
        for name, (fqn, layout) in self._program.attrs.items():
            full = source[fqn]
            piece = shard_tensor(full.detach(), layout, self._mesh, coord).clone()
            if device is not None:
                piece = piece.to(device)
            if isinstance(full, torch.nn.Parameter):
                root.register_parameter(name, torch.nn.Parameter(
                    piece, requires_grad=full.requires_grad))
            else:
                root.register_buffer(name, piece)
        graph = copy.deepcopy(self._program.graph)
        gm = fx.GraphModule(root, graph, "RankProgram")
        return gm

    # -- running --------------------------------------------------------------------------------

    @faults.guarded("in forward")
    def forward(self, *args, **kwargs):
        """The full batch's outputs, as one device computes them (with autograd)."""
        inputs = self._captured.flatten_inputs(args, kwargs)
        if self._micro is None:
            outs = self._run(inputs)
        else:
            self._check_inputs(inputs, self._micro.full_shapes)
            outs = self._micro.combine([self._run(mine)
                                        for mine in self._micro.program_inputs(inputs)])
        return self._captured.unflatten_outputs(list(outs), inputs)

    @faults.guarded("in step")
    def step(self, *args, **kwargs) -> torch.Tensor:
        """Forward and backward of a whole step on the global batch: every micro-batch in
        turn, gradients added into ``.grad`` (summed over ranks once per step). Returns the
        loss one device computes for the batch (detached): the model's first floating-point
        scalar output."""
        inputs = self._captured.flatten_inputs(args, kwargs)
        i = self._loss_index()
        if self._micro is None:
            loss = self._run(inputs, step=True)[i]
            loss.backward()
            return loss.detach()
        self._check_inputs(inputs, self._micro.full_shapes)
        per_micro = self._micro.program_inputs(inputs)
        parts = []
        for k, mine in enumerate(per_micro):
            outs = self._run(mine, step=True)
            once = self._micro.outputs[i][0] == "first"  # independent of the batch
            with self._deferred_sync(not once and k < len(per_micro) - 1):
                outs[i].backward()
            parts.append(outs[i].detach())
            if once:
                break
        return sum(parts[1:], parts[0])

    def _deferred_sync(self, defer: bool):
        if defer and self._grad_sync is not None:
            return self._grad_sync.deferred()
        return contextlib.nullcontext()

    def _loss_index(self) -> int:
        """The graph output that is the loss: the first floating-point scalar the model
        returns (:func:`~autopar.program.graph.loss_index`)."""
        if self._loss is not None:
            return self._loss
        out = next(n for n in self._captured.gm.graph.nodes if n.op == "output")
        shapes = [tuple(v.meta["val"].shape) for v in out.args[0]
                  if isinstance(v, fx.Node) and isinstance(v.meta.get("val"), torch.Tensor)]
        raise PlanError(f"step() needs the model to return its loss, a floating-point scalar; "
                        f"its outputs have shapes {shapes}: return the loss, or call the "
                        "module and backward() yourself")

    def _run(self, inputs, step: bool = False) -> list:
        """The program's flat outputs on program inputs (one micro-batch's, where split);
        with ``step``, the loss alone (the others None: nothing gathers them)."""
        self._check_inputs(inputs, self._program.input_shapes)
        programs = self._step_programs() if step else (
            list(self.ranks) if self.simulate else [self.program])
        if self.simulate:
            return list(run_replicated(programs, self._mesh, inputs))
        C.set_active_mesh(self._device_mesh)
        faults.set_active(self._epoch)
        device = _device_of(self._device_mesh)
        return list(programs[0](*[x.to(device) for x in inputs]))

    def _step_programs(self) -> list:
        """Per rank held here, the program of a training step: the loss alone, on the same
        parameters (:func:`~autopar.program.graph.loss_only`)."""
        if self._steps is None:
            full = list(self.ranks) if self.simulate else [self.program]
            self._steps = [loss_only(gm, self._loss_index()) for gm in full]
        return self._steps

    def _check_inputs(self, inputs, planned):
        """``planned``: (name, shape, dtype[, requires grad]) per input."""
        for x, (name, shape, dtype, *grad) in zip(inputs, planned):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape or x.dtype != dtype:
                got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else repr(x)
                raise InputError(f"input {name!r}: planned for shape {shape} {dtype}, got "
                                 f"{got}; call with the example's shapes or compile again "
                                 "with example_inputs of the new shape")
            if x.requires_grad and grad and not grad[0]:
                raise InputError(f"input {name!r} requires grad but was planned without: its "
                                 "gradient would miss the sums over split work; give an "
                                 "example input with requires_grad=True")

    # -- inspection -----------------------------------------------------------------------------

    @property
    def code(self) -> str:
        """This rank's program as Python source, each value's layout in a comment, then
        the source of each block it recomputes in backward."""
        from .code import program_code
        gm = self.ranks[0] if self.simulate else self.program
        header = (f"# autopar rank program: mesh {self._mesh}, plan {self.plan.fingerprint()}\n"
                  "# layouts: R replicated, S(d) split on dim d, P partial sum; one per axis\n")
        by_axes = {}
        for name, axes in self._program.grad_sync.items():
            by_axes.setdefault(axes, []).append(name)
        for axes, names in by_axes.items():
            header += (f"# gradients summed over {', '.join(axes)} after backward, in buckets: "
                       f"{', '.join(names)}\n")
        return header + program_code(self._program, gm.code) + "\n"

    def rank_program(self, rank: int | None = None) -> fx.GraphModule:
        """The fx.GraphModule rank ``rank`` runs (simulated mode: any rank)."""
        if self.simulate:
            if rank is None:
                rank = 0
            if not 0 <= rank < self._mesh.size:
                raise PlanError(f"rank {rank} is outside the mesh of {self._mesh.size} ranks")
            return self.ranks[rank]
        own = dist.get_rank()
        if rank not in (None, own):
            raise PlanError(f"rank {rank}: this process is rank {own} and holds only its own "
                            "program; use simulate=True to inspect any rank")
        return self.program

    # -- whole tensors --------------------------------------------------------------------------

    def _per_rank(self, name):
        mods = list(self.ranks) if self.simulate else [self.program]
        return [getattr(m, name) for m in mods]

    def _gather(self, vals, layout):
        return self._moved(vals, layout, replicated(self._mesh.ndim))[0].clone()

    def _moved(self, vals, src, dst) -> list:
        """Every held rank's piece of a value in layout ``src`` moved to layout ``dst``
        (no autograd)."""
        with torch.no_grad():
            vals = [v.detach() for v in vals]
            for step in plan_steps(tuple(src), tuple(dst)):
                fn, extra = C.step_call(step, self._mesh.names)
                if self.simulate:
                    vals = run_collective(fn, vals, self._mesh, extra)
                else:
                    C.set_active_mesh(self._device_mesh)
                    vals = [fn(vals[0], *extra)]
        return vals

    @faults.guarded("in full_state_dict")
    def full_state_dict(self) -> dict:
        """Every parameter and buffer gathered to its full tensor, keyed by the original FQN
        (a tied weight under each of its names, as the model's own state dict has it)."""
        out = {}
        for name, (fqn, layout) in self._program.attrs.items():
            out[fqn] = self._gather(self._per_rank(name), layout)
            for alias in self._aliases.get(fqn, ()):
                out[alias] = out[fqn]
        return out

    @faults.guarded("in full_grad_dict")
    def full_grad_dict(self) -> dict:
        """The gradient of every parameter gathered to a full tensor (None where unset)."""
        out = {}
        for name, (fqn, layout) in self._program.attrs.items():
            shards = self._per_rank(name)
            if not isinstance(shards[0], torch.nn.Parameter):
                continue
            if all(s.grad is None for s in shards):
                out[fqn] = None
                continue
            grads = [torch.zeros_like(s) if s.grad is None else s.grad for s in shards]
            out[fqn] = self._gather(grads, layout)
        return out

    def load_full_state_dict(self, state_dict: dict) -> None:
        """Copy full tensors (FQNs as in the original model) into this module's shards."""
        state.load_model_state(self, state_dict)

    # -- checkpoints ----------------------------------------------------------------------------

    @faults.guarded("in state_dict")
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False) -> dict:
        """Every parameter and buffer, keyed by the original FQN, for
        ``torch.distributed.checkpoint``: in distributed mode DTensors holding this rank's
        shards (``dcp.save`` writes each piece once; ``dcp.load`` into this dict reads the
        pieces this plan holds, whatever plan saved them); in simulated mode whole tensors.
        Load what ``dcp.load`` filled with :meth:`load_state_dict`
        (:mod:`autopar.runtime.state`)."""
        out = state.model_state(self)
        if destination is None:
            return out
        destination.update({prefix + k: v for k, v in out.items()})
        return destination

    @faults.guarded("in load_state_dict")
    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """Copy each rank's pieces of ``state_dict`` (as :meth:`state_dict` gives it, or
        whole tensors keyed by FQN) into this module's shards."""
        state.load_model_state(self, state_dict)

    @faults.guarded("in optimizer_state_dict")
    def optimizer_state_dict(self, optimizer) -> dict:
        """``optimizer``'s states and hyperparameters for this module's parameters, keyed by
        FQN in the flat form of ``torch.distributed.checkpoint.state_dict`` (states laid out
        as their parameters); states not made yet are made first, so that ``dcp.load`` can
        fill them."""
        return state.optimizer_state(self, optimizer)

    @faults.guarded("in load_optimizer_state_dict")
    def load_optimizer_state_dict(self, optimizer, state_dict: dict) -> None:
        """Set ``optimizer``'s states and hyperparameters for this module's parameters from
        ``state_dict`` (as :meth:`optimizer_state_dict` gives it)."""
        state.load_optimizer_state(self, optimizer, state_dict)

    def extra_repr(self) -> str:
        return (f"mesh={self._mesh}, mode={'simulated' if self.simulate else 'distributed'}, "
                f"params={len(self._program.attrs)}")


def _device_of(device_mesh) -> torch.device:
    if device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_mesh.device_type)


def _init_distributed(plan, mesh: Mesh):
    if not (dist.is_available() and dist.is_initialized()):
        raise PlanError("torch.distributed is not initialized: launch with torchrun and call "
                        "torch.distributed.init_process_group(), or pass simulate=True to run "
                        "all ranks in this process")
    world = dist.get_world_size()
    if world != mesh.size:
        raise PlanError(f"the plan is for {mesh.size} ranks (mesh {mesh}) but torch.distributed "
                        f"has world size {world}; launch with --nproc_per_node {mesh.size} or "
                        f"plan for a cluster of {world} devices")
    faults.check_same_plan(plan)  # through the store, before any collective
    from torch.distributed.device_mesh import init_device_mesh
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    if device_type == "cuda":
        import os
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return init_device_mesh(device_type, mesh.shape, mesh_dim_names=mesh.names)
