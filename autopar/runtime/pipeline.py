"""PipelineModule: the stages of a pipelined plan, each a ParallelModule on its own devices,
run micro-batch by micro-batch in the order of the plan's schedule.

Every stage's program is the slice of the graph it owns (``autopar.program.stages``): its
parameters, its layers, and the values it receives from the stage before and hands to the
next. A step plays the schedule (:func:`autopar.search.stages.schedule_orders`): a forward
action runs one micro-batch through one stage on the values the stage before handed on, cut
from their autograd history; a backward action runs that stage's backward from the gradients
the stage after handed back, and hands the gradients of its own inputs on. Each stage sums its
gradients over its ranks once per step (its last backward). A parameter read in two stages (a
tied embedding and head) has a copy in each, and their gradients are summed after the step's
last backward, so the copies stay equal under any optimizer.

In simulated mode every stage runs in this process, every rank of it together. In distributed
mode each process builds the stages its rank is in (one, or v of interleaved 1F1B), each a
ParallelModule over its part of the world's ``("pp", ...)`` DeviceMesh. A value handed to the
next stage travels in equal parts: each rank sends its part to the rank at its place in the
next stage, whose ranks gather the parts (as Megatron scatters and gathers them), so the
link between stages carries each value once; gradients come back the same way.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..errors import PlanError
from ..options import schedule_chunks
from . import faults, state
from .module import ParallelModule, _device_of, shard_tensor


class _StageRun:
    """One stage's part of a step: per micro-batch what its forward took and gave."""

    def __init__(self):
        self.inputs = {}      # micro -> list of boundary inputs cut from autograd (or None)
        self.outputs = {}     # micro -> list of outputs
        self.grads_in = {}    # micro -> {value name: gradient} from the stage after


class PipelineModule(torch.nn.Module):
    """The pipelined program of one planned model (see :func:`autopar.compile`)."""

    def __init__(self, captured, plan, stages, source, simulate: bool, micro=None):
        super().__init__()
        self.plan = plan
        self.simulate = simulate
        self._captured = captured
        self._micro = micro
        self._graphs = [st.graph for st in stages]
        self._ranks = [st.ranks for st in stages]
        self._name, self._v = schedule_chunks(plan.schedule)
        self._p = len(stages) // self._v
        self._n = len(stages)
        self._all_attrs = [st.ctx.program.attrs for st in stages]
        self._source_shapes = {fqn: (tuple(t.shape), t.dtype) for fqn, t in source.items()}
        self._trainable_fqns = {fqn for fqn, t in source.items()
                                if isinstance(t, torch.nn.Parameter) and t.requires_grad}
        self._epoch = None   # distributed: the plan check's (faults.guarded)
        if simulate:
            self._mine = list(range(self._n))
            device_mesh = None
        else:
            device_mesh = self._init_distributed(stages)
            rank = dist.get_rank()
            self._mine = [s for s in range(self._n) if rank in self._ranks[s]]
        modules = []
        for s in self._mine:
            st = stages[s]
            sc = dataclasses.replace(captured, gm=st.graph.gm,
                                     input_names=list(st.graph.input_names))
            modules.append(ParallelModule(sc, st.ctx.plan, st.ctx.program, source, simulate,
                                          device_mesh=device_mesh))
        self.stages = torch.nn.ModuleList(modules)
        self._local = {s: i for i, s in enumerate(self._mine)}
        self._tied = self._tied_parameters()

    def _init_distributed(self, stages):
        """The world's ("pp", ...) DeviceMesh, in rank order, and this rank's part of it; a
        process group per group of ranks (to gather the parts of handed values) and per
        pair of peers holding copies of a tied parameter."""
        from .module import _init_distributed
        from ..program.mesh import Mesh
        sub = stages[0].ctx.program.mesh
        d = sub.size
        world = Mesh(("pp",) + tuple(sub.names), (self._p,) + tuple(sub.shape))
        world_mesh = _init_distributed(self.plan, world)
        self._epoch = faults.current_epoch()
        self._device_mesh = world_mesh[tuple(sub.names)] if sub.names else world_mesh
        starts = sorted({r.start for r in self._ranks})
        self._groups = {}
        for start in starts:   # every rank makes every group, in one order
            self._groups[start] = dist.new_group(list(range(start, start + d)))
        self._pair_groups = {}
        tied = {}
        for s, attrs in enumerate(self._all_attrs):
            for fqn, _ in attrs.values():
                tied.setdefault(fqn, [])
                if s not in tied[fqn]:
                    tied[fqn].append(s)
        for fqn, where in tied.items():
            if len(where) < 2:
                continue
            for i in range(d):
                ranks = sorted({self._ranks[s].start + i for s in where})
                key = tuple(ranks)
                if len(ranks) > 1 and key not in self._pair_groups:
                    self._pair_groups[key] = dist.new_group(ranks)
        self._device = _device_of(world_mesh)
        return self._device_mesh

    def _tied_parameters(self) -> dict:
        """FQN -> [(stage, local name)] for trainable parameters read in several stages (every
        stage's, held here or not)."""
        where = {}
        for s, attrs in enumerate(self._all_attrs):
            for name, (fqn, _) in attrs.items():
                if self._trainable(fqn):
                    where.setdefault(fqn, []).append((s, name))
        return {fqn: places for fqn, places in where.items() if len(places) > 1}

    def _trainable(self, fqn) -> bool:
        return fqn in self._trainable_fqns

    def _stage(self, s) -> ParallelModule:
        return self.stages[self._local[s]]

    # -- running --------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """The full batch's outputs, as one device computes them (with autograd through every
        stage; train with :meth:`step`, which also sums the gradients of tied parameters).
        Simulated mode only."""
        if not self.simulate:
            raise PlanError("a pipelined module runs a training step with pm.step(*inputs) "
                            "under torchrun (its stages live on different ranks); calling it "
                            "works in simulated mode")
        inputs = self._captured.flatten_inputs(args, kwargs)
        per_micro = self._program_inputs(inputs)
        outs = []
        for mine in per_micro:
            values = {}
            for s, pm in enumerate(self.stages):
                got = pm._run(self._stage_inputs(s, mine, values))
                if self._graphs[s].outputs is None:
                    outs.append(got)
                else:
                    values.update(zip(self._graphs[s].outputs, got))
        combined = outs[0] if self._micro is None else self._micro.combine(outs)
        return self._captured.unflatten_outputs(list(combined), inputs)

    @faults.guarded("in step")
    def step(self, *args, **kwargs) -> torch.Tensor:
        """Forward and backward of a whole step on the global batch, every micro-batch through
        every stage in the schedule's order; returns the loss one device computes (detached,
        on every rank)."""
        from ..search.stages import schedule_orders
        inputs = self._captured.flatten_inputs(args, kwargs)
        per_micro = self._program_inputs(inputs)
        if not self.simulate:
            per_micro = [[x.to(self._device) if isinstance(x, torch.Tensor) else x for x in mine]
                         for mine in per_micro]
        i = self._loss_index()
        how = self._micro.outputs[i][0] if self._micro is not None else "sum"
        orders = schedule_orders(self._name, self._p, self._v, len(per_micro))
        if not self.simulate:   # this rank's place in the pipeline runs one list
            position = self._mine[0] % self._p
            orders = [orders[position]]
        last_backward = {}
        for acts in orders:
            for a in acts:
                if a.kind == "B":
                    last_backward[a.stage] = a.micro
        runs = {s: _StageRun() for s in self._mine}
        losses, done, sends = {}, set(), []
        before = self._tied_gradients_now()
        nxt = [0] * len(orders)
        left = sum(len(o) for o in orders)
        while left:
            moved = False
            for r, acts in enumerate(orders):
                while nxt[r] < len(acts):
                    a = acts[nxt[r]]
                    if self.simulate and not self._ready(a, done):
                        break
                    if a.kind == "F":
                        self._forward(a.stage, a.micro, per_micro[a.micro], runs, losses, i,
                                      sends)
                    else:
                        seed = 1.0 if how != "first" or a.micro == 0 else 0.0
                        self._backward(a.stage, a.micro, runs, seed,
                                       last_backward[a.stage] != a.micro, sends)
                    done.add((a.kind, a.stage, a.micro))
                    nxt[r] += 1
                    left -= 1
                    moved = True
            if not moved:
                raise RuntimeError("pipeline schedule deadlocked")
        for work in sends:
            work.wait()
        self._sum_tied_gradients(before)
        loss = self._total_loss(losses, how)
        return loss

    def _loss_index(self) -> int:
        if self.simulate or self._n - 1 in self._local:
            return self._last()._loss_index()
        from ..program.graph import loss_index
        out = next(n for n in self._graphs[-1].gm.graph.nodes if n.op == "output")
        return loss_index(list(out.args[0]))

    def _last(self):
        return self._stage(self._n - 1)

    def _total_loss(self, losses, how):
        """The step's loss: the sum of the micro-batches' (the first's where it does not
        depend on the batch), sent from the last stage to every rank."""
        if losses:
            parts = [losses[k] for k in sorted(losses)]
            total = parts[0] if how == "first" else sum(parts[1:], parts[0])
        else:
            total = None
        if self.simulate:
            return total
        out_node = next(n for n in self._graphs[-1].gm.graph.nodes if n.op == "output")
        val = out_node.args[0][self._loss_index()].meta["val"]
        buf = total.detach().clone() if total is not None else \
            torch.zeros((), dtype=val.dtype, device=self._device)
        dist.broadcast(buf, src=self._ranks[-1].start)
        return buf

    def _ready(self, a, done) -> bool:
        if a.kind == "F":
            return a.stage == 0 or ("F", a.stage - 1, a.micro) in done
        return ("F", a.stage, a.micro) in done and \
            (a.stage == self._n - 1 or ("B", a.stage + 1, a.micro) in done)

    def _forward(self, s, k, mine, runs, losses, loss_index, sends):
        pm, graph = self._stage(s), self._graphs[s]
        if s > 0 and not self.simulate:
            runs[s].inputs[k] = self._receive(s, k, "F")
        received = runs[s].inputs.get(k, {})
        ins = [mine[ref] if kind == "input" else received[ref] for kind, ref in graph.inputs]
        if graph.outputs is None:
            loss = pm._run(ins, step=True)[loss_index]
            runs[s].outputs[k] = [loss]
            losses[k] = loss.detach()
            return
        outs = pm._run(ins)
        runs[s].outputs[k] = outs
        if self.simulate:
            handed = {}
            for name, t in zip(graph.outputs, outs):
                cut = t.detach()
                if t.requires_grad:
                    cut.requires_grad_(True)
                handed[name] = cut
            runs[s + 1].inputs[k] = handed
        else:
            sends += self._send(s + 1, k, "F", dict(zip(graph.outputs, outs)))

    def _backward(self, s, k, runs, seed, defer: bool, sends):
        pm, graph = self._stage(s), self._graphs[s]
        outs = runs[s].outputs.pop(k)
        if graph.outputs is None:
            tensors, grads = outs, [torch.full_like(outs[0], seed)]
        else:
            got = runs[s].grads_in.pop(k, None)
            if got is None:
                got = self._receive(s, k, "B") if not self.simulate else {}
            tensors, grads = [], []
            for name, t in zip(graph.outputs, outs):
                g = got.get(name)
                if t.requires_grad and g is not None:
                    tensors.append(t)
                    grads.append(g)
        if not self.simulate:
            from . import collectives as C
            C.set_active_mesh(self._device_mesh)
            faults.set_active(self._epoch)
        with pm._deferred_sync(defer):
            if tensors:
                torch.autograd.backward(tensors, grads)
        received = runs[s].inputs.pop(k, {})
        if s > 0:
            grads_out = {name: (x.grad if x.grad is not None else torch.zeros_like(x))
                         for name, x in received.items() if x.requires_grad}
            if self.simulate:
                runs[s - 1].grads_in[k] = grads_out
            else:
                sends += self._send(s - 1, k, "B", grads_out)

    # -- values between stages (distributed) ----------------------------------------------------

    def _boundary(self, s) -> list:
        """(name, shape, dtype, needs grad) of each value stage ``s`` receives."""
        out = []
        for ph in self._graphs[s].gm.graph.nodes:
            if ph.op == "placeholder" and ("value", ph.name) in self._graphs[s].inputs:
                v = ph.meta["val"]
                out.append((ph.name, tuple(v.shape), v.dtype,
                            bool(v.requires_grad) and v.is_floating_point()))
        return out

    def _tag(self, s, k, kind) -> int:
        return (k * self._n + s) * 2 + (kind == "B")

    def _send(self, s, k, kind, values: dict) -> list:
        """Send this rank's part of each value to its peer in stage ``s`` (the stage after
        for a forward, before for a backward). Returns the pending sends."""
        here = next(st for st in self._mine if (st == s - 1 if kind == "F" else st == s + 1))
        place = dist.get_rank() - self._ranks[here].start
        peer = self._ranks[s].start + place
        d = len(self._ranks[here])
        works = []
        names = self._boundary(s if kind == "F" else here)
        for name, _, _, grad in names:
            if kind == "B" and not grad:
                continue
            flat = values[name].detach().reshape(-1)
            part = _part(flat, d, place).contiguous()
            works.append(dist.isend(part, peer, tag=self._tag(s, k, kind)))
        return works

    def _receive(self, s, k, kind) -> dict:
        """The values stage ``s`` receives (a forward) or the gradients of its outputs (a
        backward), whole: this rank's part from its peer, gathered over its group."""
        source_stage = s - 1 if kind == "F" else s + 1
        place = dist.get_rank() - self._ranks[s].start
        peer = self._ranks[source_stage].start + place
        d = len(self._ranks[s])
        group = self._groups[self._ranks[s].start]
        names = self._boundary(s if kind == "F" else source_stage)
        out = {}
        for name, shape, dtype, grad in names:
            if kind == "B" and not grad:
                continue
            numel = 1
            for n in shape:
                numel *= n
            size = -(-numel // d)
            part = torch.empty(size, dtype=dtype, device=self._device)
            dist.recv(part, peer, tag=self._tag(s, k, kind))
            parts = [torch.empty_like(part) for _ in range(d)]
            if d > 1:
                dist.all_gather(parts, part, group=group)
            else:
                parts = [part]
            whole = torch.cat(parts)[:numel].view(shape)
            if kind == "F" and grad:
                whole.requires_grad_(True)
            out[name] = whole
        return out

    # -- whole tensors --------------------------------------------------------------------------

    def _program_inputs(self, inputs) -> list:
        if self._micro is None:
            return [list(inputs)]
        self.stages[0]._check_inputs(inputs, self._micro.full_shapes)
        return self._micro.program_inputs(inputs)

    def _stage_inputs(self, s, mine, values):
        return [mine[ref] if kind == "input" else values[ref]
                for kind, ref in self._graphs[s].inputs]

    def _whole(self, s, name, grad: bool):
        """The whole tensor (its gradient with ``grad``) of stage ``s``'s attribute ``name``
        on every rank of that stage (None where it has no gradient)."""
        pm = self._stage(s)
        shards = pm._per_rank(name)
        layout = pm._program.attrs[name][1]
        if grad:
            if all(x.grad is None for x in shards):
                return None
            shards = [torch.zeros_like(x) if x.grad is None else x.grad for x in shards]
        return pm._gather(shards, layout)

    def _tied_gradients_now(self) -> dict:
        """(stage, local name) -> a copy of each rank's gradient of each tied parameter held
        here (None where unset): what a step's sums start from."""
        out = {}
        for fqn, places in self._tied.items():
            for s, name in places:
                if s in self._local:
                    out[(s, name)] = [None if x.grad is None else x.grad.detach().clone()
                                      for x in self._stage(s)._per_rank(name)]
        return out

    def _sum_tied_gradients(self, before: dict):
        """Each copy of a parameter read in several stages gets what it held before the step
        (the same in every copy) plus the sum of every copy's gradient from this step, so
        that gradients accumulated over several steps stay exact."""
        for fqn, places in self._tied.items():
            mine = [(s, name) for s, name in places if s in self._local]
            fulls = []
            for s, name in mine:
                pm, layout = self._stage(s), self._stage(s)._program.attrs[name][1]
                shards = pm._per_rank(name)
                if all(x.grad is None for x in shards):
                    continue
                had = before.get((s, name)) or [None] * len(shards)
                step = [torch.zeros_like(x) if x.grad is None else
                        x.grad if h is None else x.grad - h for x, h in zip(shards, had)]
                fulls.append(pm._gather(step, layout))
            if self.simulate:
                if not fulls:
                    continue
                total = sum(fulls[1:], fulls[0])
            else:
                shape, dtype = self._source_shapes[fqn]
                total = sum(fulls[1:], fulls[0]) if fulls else \
                    torch.zeros(shape, dtype=dtype, device=self._device)
                place = dist.get_rank() - self._ranks[self._mine[0]].start
                key = tuple(sorted({self._ranks[s].start + place for s, _ in places}))
                if len(key) > 1:
                    dist.all_reduce(total, group=self._pair_groups[key])
            for s, name in mine:
                pm = self._stage(s)
                layout = pm._program.attrs[name][1]
                had = before.get((s, name)) or [None] * len(pm._coords)
                for x, coord, h in zip(pm._per_rank(name), pm._coords, had):
                    piece = shard_tensor(total, layout, pm._mesh, coord).clone()
                    x.grad = piece if h is None else h + piece

    # -- inspection and whole tensors -----------------------------------------------------------

    @property
    def code(self) -> str:
        """Each stage's rank program held here, in pipeline order."""
        parts = []
        for s in self._mine:
            r = self._ranks[s]
            layers = self._graphs[s].layers
            parts.append(f"# ---- stage {s}: ranks {r.start}..{r.stop - 1}, layers "
                         f"{layers[0]} .. {layers[-1]} ({len(layers)})\n" + self._stage(s).code)
        return "\n".join(parts)

    def rank_program(self, rank: int | None = None):
        """The fx.GraphModule of the (first) stage holding ``rank`` (rank 0 by default;
        distributed: this rank's)."""
        if not self.simulate:
            return self._stage(self._mine[0]).rank_program()
        rank = 0 if rank is None else rank
        for s, r in enumerate(self._ranks):
            if rank in r:
                return self._stage(s).rank_program(rank - r.start)
        raise PlanError(f"rank {rank} is outside the plan's {self.plan.world_size} ranks")

    def _every(self, grad: bool) -> dict:
        """Every stage's attributes whole, keyed by FQN, on every rank: in distributed mode
        each stage gathers its own and its first rank sends them to all."""
        out = {}
        for s in range(self._n):
            for name, (fqn, _) in self._all_attrs[s].items():
                if fqn in out and out[fqn] is not None:
                    continue
                if grad and not self._trainable(fqn):
                    continue
                value = self._whole(s, name, grad) if s in self._local else None
                if not self.simulate:
                    shape, dtype = self._source_shapes[fqn]
                    flag = torch.tensor([0 if value is None else 1], device=self._device)
                    dist.broadcast(flag, src=self._ranks[s].start)
                    if flag.item():
                        buf = value.detach().clone().to(self._device) if value is not None \
                            else torch.empty(shape, dtype=dtype, device=self._device)
                        dist.broadcast(buf, src=self._ranks[s].start)
                        value = buf
                    else:
                        value = None
                out[fqn] = value
        aliases = {}
        for pm in self.stages:
            for first, more in pm._aliases.items():
                aliases.setdefault(first, set()).update(more)
        for first, more in aliases.items():
            for alias in more:
                if first in out:
                    out.setdefault(alias, out[first])
        return out

    @faults.guarded("in full_state_dict")
    def full_state_dict(self) -> dict:
        """Every parameter and buffer whole, keyed by the original FQN, on every rank."""
        return self._every(grad=False)

    @faults.guarded("in full_grad_dict")
    def full_grad_dict(self) -> dict:
        """The gradient of every parameter whole (None where unset), on every rank."""
        return self._every(grad=True)

    def load_full_state_dict(self, state_dict: dict) -> None:
        """Copy full tensors (FQNs as in the original model) into each stage's shards."""
        for pm in self.stages:
            pm.load_full_state_dict(state_dict)

    # -- checkpoints (ParallelModule's, over the stages held here) -----------------------------

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False) -> dict:
        """Every parameter and buffer of the stages held here, keyed by FQN, as
        :meth:`ParallelModule.state_dict` gives them: a checkpoint saved by every rank holds
        the whole model once, and loads under any other set of stages. A parameter that
        stages hold in different layouts (a tied embedding and head) enters it whole."""
        out = {}
        for pm in self.stages:
            for k, v in state.model_state(pm, self._laid_out_apart()).items():
                out.setdefault(k, v)
        if destination is None:
            return out
        destination.update({prefix + k: v for k, v in out.items()})
        return destination

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        for pm in self.stages:
            pm.load_state_dict(state_dict)

    def optimizer_state_dict(self, optimizer) -> dict:
        out = {}
        for pm in self.stages:
            for k, v in state.optimizer_state(pm, optimizer, self._laid_out_apart()).items():
                out.setdefault(k, v)
        return out

    def _laid_out_apart(self) -> set:
        """The FQNs that stages hold copies of in different layouts: a checkpoint takes
        them whole, the one chunk every copy writes alike."""
        layouts = {}
        for attrs in self._all_attrs:
            for fqn, layout in attrs.values():
                layouts.setdefault(fqn, set()).add(tuple(layout))
        return {fqn for fqn, seen in layouts.items() if len(seen) > 1}

    def load_optimizer_state_dict(self, optimizer, state_dict: dict) -> None:
        for pm in self.stages:
            pm.load_optimizer_state_dict(optimizer, state_dict)

    def extra_repr(self) -> str:
        return f"stages={self._n}, schedule={self.plan.schedule}"


def _part(flat: torch.Tensor, d: int, place: int) -> torch.Tensor:
    """Part ``place`` of ``d`` equal parts of a flat tensor (the last padded with zeros)."""
    size = -(-flat.numel() // d)
    piece = flat[place * size:(place + 1) * size]
    if piece.numel() < size:
        piece = torch.cat([piece, piece.new_zeros(size - piece.numel())])
    return piece
