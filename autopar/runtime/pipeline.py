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

In simulated mode every stage runs in this process, every rank of it together.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import PlanError
from ..options import schedule_chunks
from .module import ParallelModule, shard_tensor


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
        if not simulate:
            raise PlanError("a plan with pipeline stages runs in simulated mode "
                            "(simulate=True) in this version; plan without a 'pp' axis to "
                            "run it under torchrun")
        self.plan = plan
        self.simulate = simulate
        self._captured = captured
        self._micro = micro
        self._graphs = [st.graph for st in stages]
        self._ranks = [st.ranks for st in stages]
        modules = []
        import dataclasses
        for st in stages:
            sc = dataclasses.replace(captured, gm=st.graph.gm,
                                     input_names=list(st.graph.input_names))
            modules.append(ParallelModule(sc, st.ctx.plan, st.ctx.program, source, simulate))
        self.stages = torch.nn.ModuleList(modules)
        self._name, self._v = schedule_chunks(plan.schedule)
        self._p = len(stages) // self._v
        self._tied = self._tied_parameters()

    def _tied_parameters(self) -> dict:
        """FQN -> [(stage index, local name)] for parameters read in more than one stage."""
        where = {}
        for s, pm in enumerate(self.stages):
            for name, (fqn, _) in pm._program.attrs.items():
                if isinstance(getattr(pm.ranks[0], name), torch.nn.Parameter):
                    where.setdefault(fqn, []).append((s, name))
        return {fqn: places for fqn, places in where.items() if len(places) > 1}

    # -- running --------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """The full batch's outputs, as one device computes them (with autograd through every
        stage; train with :meth:`step`, which also sums the gradients of tied parameters)."""
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

    def step(self, *args, **kwargs) -> torch.Tensor:
        """Forward and backward of a whole step on the global batch, every micro-batch through
        every stage in the schedule's order; returns the loss one device computes (detached)."""
        inputs = self._captured.flatten_inputs(args, kwargs)
        per_micro = self._program_inputs(inputs)
        last = self.stages[-1]
        i = last._loss_index()
        how = self._micro.outputs[i][0] if self._micro is not None else "sum"
        from ..search.stages import schedule_orders
        orders = schedule_orders(self._name, self._p, self._v, len(per_micro))
        runs = [_StageRun() for _ in self.stages]
        last_backward = {}
        for acts in orders:
            for a in acts:
                if a.kind == "B":
                    last_backward[a.stage] = a.micro
        losses = {}
        done = set()
        nxt = [0] * len(orders)
        left = sum(len(o) for o in orders)
        while left:
            moved = False
            for r, acts in enumerate(orders):
                while nxt[r] < len(acts):
                    a = acts[nxt[r]]
                    if not self._ready(a, done):
                        break
                    if a.kind == "F":
                        self._forward(a.stage, a.micro, per_micro[a.micro], runs, losses, i)
                    else:
                        seed = 1.0 if how != "first" or a.micro == 0 else 0.0
                        self._backward(a.stage, a.micro, runs, losses, seed,
                                       defer=last_backward[a.stage] != a.micro)
                    done.add((a.kind, a.stage, a.micro))
                    nxt[r] += 1
                    left -= 1
                    moved = True
            if not moved:
                raise RuntimeError("pipeline schedule deadlocked")
        self._sum_tied_gradients()
        parts = [losses[k] for k in sorted(losses)]
        if how == "first":
            return parts[0]
        return sum(parts[1:], parts[0])

    def _ready(self, a, done) -> bool:
        n = len(self.stages)
        if a.kind == "F":
            return a.stage == 0 or ("F", a.stage - 1, a.micro) in done
        return ("F", a.stage, a.micro) in done and \
            (a.stage == n - 1 or ("B", a.stage + 1, a.micro) in done)

    def _forward(self, s, k, mine, runs, losses, loss_index):
        pm, graph = self.stages[s], self._graphs[s]
        received = runs[s].inputs.get(k, {})
        ins = []
        for kind, ref in graph.inputs:
            ins.append(mine[ref] if kind == "input" else received[ref])
        if graph.outputs is None:
            outs = pm._run(ins, step=True)
            loss = outs[loss_index]
            runs[s].outputs[k] = [loss]
            losses[k] = loss.detach()
            return
        outs = pm._run(ins)
        runs[s].outputs[k] = outs
        handed = {}
        for name, t in zip(graph.outputs, outs):
            cut = t.detach()
            if t.requires_grad:
                cut.requires_grad_(True)
            handed[name] = cut
        runs[s + 1].inputs[k] = handed

    def _backward(self, s, k, runs, losses, seed, defer: bool):
        pm, graph = self.stages[s], self._graphs[s]
        outs = runs[s].outputs.pop(k)
        if graph.outputs is None:
            tensors, grads = outs, [torch.full_like(outs[0], seed)]
        else:
            got = runs[s].grads_in.pop(k, {})
            tensors, grads = [], []
            for name, t in zip(graph.outputs, outs):
                g = got.get(name)
                if t.requires_grad and g is not None:
                    tensors.append(t)
                    grads.append(g)
        with pm._deferred_sync(defer) if defer else contextlib.nullcontext():
            if tensors:
                torch.autograd.backward(tensors, grads)
            elif pm._grad_sync is not None and not defer:
                pass
        received = runs[s].inputs.pop(k, {})
        if s > 0:
            runs[s - 1].grads_in[k] = {name: x.grad for name, x in received.items()
                                       if x.requires_grad and x.grad is not None}

    def _program_inputs(self, inputs) -> list:
        if self._micro is None:
            self.stages[0]._check_inputs(inputs, [
                (n, tuple(x.shape), x.dtype) for n, x in
                zip(self._captured.input_names, self._captured.example_inputs)])
            return [list(inputs)]
        self.stages[0]._check_inputs(inputs, self._micro.full_shapes)
        return self._micro.program_inputs(inputs)

    def _stage_inputs(self, s, mine, values):
        return [mine[ref] if kind == "input" else values[ref]
                for kind, ref in self._graphs[s].inputs]

    def _sum_tied_gradients(self):
        """Each copy of a parameter read in several stages gets the sum of their gradients."""
        for fqn, places in self._tied.items():
            fulls = []
            for s, name in places:
                pm = self.stages[s]
                shards = pm._per_rank(name)
                if all(x.grad is None for x in shards):
                    continue
                grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in shards]
                fulls.append(pm._gather(grads, pm._program.attrs[name][1]))
            if len(fulls) < 2:
                continue
            total = sum(fulls[1:], fulls[0])
            for s, name in places:
                pm = self.stages[s]
                layout = pm._program.attrs[name][1]
                for x, coord in zip(pm._per_rank(name), pm._coords):
                    x.grad = shard_tensor(total, layout, pm._mesh, coord).clone()

    # -- inspection and whole tensors -----------------------------------------------------------

    @property
    def code(self) -> str:
        """Each stage's rank program, in pipeline order."""
        parts = []
        for s, pm in enumerate(self.stages):
            r = self._ranks[s]
            layers = self._graphs[s].layers
            parts.append(f"# ---- stage {s}: ranks {r.start}..{r.stop - 1}, layers "
                         f"{layers[0]} .. {layers[-1]} ({len(layers)})\n" + pm.code)
        return "\n".join(parts)

    def rank_program(self, rank: int | None = None):
        """The fx.GraphModule of the stage holding ``rank`` (the first stage's by default)."""
        rank = 0 if rank is None else rank
        for s, r in enumerate(self._ranks):
            if rank in r:
                return self.stages[s].rank_program(rank - r.start)
        raise PlanError(f"rank {rank} is outside the plan's {self.plan.world_size} ranks")

    def full_state_dict(self) -> dict:
        out = {}
        for pm in self.stages:
            for k, v in pm.full_state_dict().items():
                out.setdefault(k, v)
        return out

    def full_grad_dict(self) -> dict:
        out = {}
        for pm in self.stages:
            for k, v in pm.full_grad_dict().items():
                if out.get(k) is None:
                    out[k] = v
        return out

    def load_full_state_dict(self, state_dict: dict) -> None:
        for pm in self.stages:
            pm.load_full_state_dict(state_dict)

    def extra_repr(self) -> str:
        return f"stages={len(self.stages)}, schedule={self.plan.schedule}"
