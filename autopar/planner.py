"""The propagation planner: data parallel by default, user constraints pinned and propagated.

The mesh is 1-D over all devices unless ``mesh=`` is given. Parameters are replicated unless a
constraint pins them; each tensor input is split on its batch dim (dim 0) across the mesh axes
on which no constraint splits a parameter, where it divides. Then every op, in graph order,
takes the strategy with the least predicted time given the layouts its inputs arrive in:
redistribution on each input edge plus its compute share.
"""

from __future__ import annotations

import fnmatch
import math

import torch

from .errors import PlanError, closest
from .mesh import Mesh
from .placement import Partial, Replicate, Shard, divides, format_layout, parse_layout, replicated
from .redistribute import local_bytes_after, plan_steps, step_bytes
from .rules import out_vals, strategies, tensor_inputs

R = Replicate()


def choose_mesh(cluster, mesh_request) -> Mesh:
    if mesh_request is None:
        return Mesh(("dp",), (cluster.world_size,))
    mesh = Mesh.from_dict(mesh_request)
    if mesh.size != cluster.world_size:
        raise PlanError(f"mesh {mesh} has {mesh.size} devices but the cluster {cluster} has "
                        f"{cluster.world_size}; give axes whose sizes multiply to "
                        f"{cluster.world_size}")
    return mesh


def axis_links(cluster, mesh: Mesh) -> list:
    """The slowest link each mesh axis's groups cross (inter-node if any group spans nodes)."""
    node_of = []
    for i, node in enumerate(cluster.nodes):
        node_of += [i] * node.count
    links = []
    for a in range(mesh.ndim):
        spans = any(len({node_of[r] for r in g}) > 1 for g in mesh.groups(a))
        if spans:
            links.append(cluster.inter_node)
        else:
            links.append(min((n.intra_node for n in cluster.nodes),
                             key=lambda l: l.bandwidth_bytes_per_s))
    return links


def resolve_constraints(constraints, fqns, shapes: dict, mesh: Mesh) -> dict:
    """FQN glob -> layout, checked and expanded to FQN -> layout."""
    out = {}
    for pattern, layout in (constraints or {}).items():
        matched = [f for f in fqns if fnmatch.fnmatchcase(f, pattern)]
        if not matched:
            raise PlanError(f"constraint {pattern!r} matches no parameter; closest names: "
                            f"{closest(pattern.replace('*', ''), fqns)}")
        if isinstance(layout, str):
            layout = parse_layout(layout)
        if not isinstance(layout, (tuple, list)) or not all(
                isinstance(p, (Shard, Replicate, Partial)) for p in layout):
            raise PlanError(f"constraint {pattern!r}: {layout!r} is not a tuple of placements; "
                            "write e.g. (Replicate(), Shard(0)) or 'RS(0)'")
        layout = tuple(layout)
        if len(layout) != mesh.ndim:
            raise PlanError(f"constraint {pattern!r}: layout {format_layout(layout)} has "
                            f"{len(layout)} placements but mesh {mesh} has {mesh.ndim} axes; "
                            "give one placement per mesh axis")
        if any(isinstance(p, Partial) for p in layout):
            raise PlanError(f"constraint {pattern!r}: a parameter cannot be stored Partial; "
                            "use Shard(dim) or Replicate()")
        for f in matched:
            shape = shapes[f]
            norm = tuple(Shard(p.dim + len(shape)) if isinstance(p, Shard) and p.dim < 0 else p
                         for p in layout)
            if not divides(shape, norm, mesh.shape):
                raise PlanError(f"constraint {pattern!r}: layout {format_layout(layout)} does "
                                f"not split {f} of shape {tuple(shape)} evenly over mesh "
                                f"{mesh}; pick a dim whose size divides")
            out[f] = norm
    return out


def input_layout(shape, free_axes, mesh: Mesh) -> tuple:
    layout = list(replicated(mesh.ndim))
    if not shape:
        return tuple(layout)
    pieces = 1
    for a in free_axes:
        if shape[0] % (pieces * mesh.shape[a]) == 0:
            layout[a] = Shard(0)
            pieces *= mesh.shape[a]
    return tuple(layout)


class Pricer:
    """Seconds for redistributions and compute under a cluster, used by the planner."""

    def __init__(self, cluster, mesh: Mesh):
        self.mesh = mesh
        self.links = axis_links(cluster, mesh)
        self.peak_flops = min(d.flops_for("fp32") for d in cluster.devices())

    def redistribute_s(self, num_bytes: float, src, dst) -> float:
        if src == dst:
            return 0.0
        local = num_bytes * _fraction(src, self.mesh)
        total = 0.0
        for step in plan_steps(src, dst):
            n = self.mesh.shape[step.axis]
            sent = step_bytes(step, local, n)
            if sent:
                link = self.links[step.axis]
                total += sent / link.bandwidth_bytes_per_s + link.latency_s * (n - 1)
            local = local_bytes_after(step, local, n)
        return total

    def compute_s(self, flops: float, out_layout) -> float:
        split = math.prod(n for p, n in zip(out_layout, self.mesh.shape)
                          if not isinstance(p, Replicate))
        return 3.0 * flops / split / self.peak_flops  # forward + backward (~2x forward)


def _fraction(layout, mesh):
    return 1.0 / math.prod(n for p, n in zip(layout, mesh.shape) if isinstance(p, Shard)) \
        if any(isinstance(p, Shard) for p in layout) else 1.0


def _value_bytes(node) -> float:
    return float(sum(v.numel() * v.element_size() for v in out_vals(node)
                     if isinstance(v, torch.Tensor)))


def propagate(gm, mesh: Mesh, fixed: dict, pricer: Pricer) -> dict:
    """Choose each call node's strategy greedily in graph order.

    ``fixed`` maps placeholder and get_attr nodes to their layouts. Returns node -> Strategy
    and writes ``node.meta["autopar.strategy"]`` and ``node.meta["autopar.layout"]``.
    """
    chosen = {}
    for node in gm.graph.nodes:
        if node in fixed:
            node.meta["autopar.layout"] = fixed[node]
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        ins = tensor_inputs(node)
        best, best_s = None, math.inf
        for strat in strategies(node, mesh.shape):
            t = pricer.compute_s(strat.spec.flops, strat.output)
            for src, need in zip(ins, strat.inputs):
                have = src.meta["autopar.layout"]
                if isinstance(src.meta["val"], (tuple, list)) and have != need:
                    t = math.inf  # a tuple of values is consumed in its own layout
                    break
                t += pricer.redistribute_s(_value_bytes(src), have, need)
            if t < best_s:
                best, best_s = strat, t
        if best is None:
            raise PlanError(f"no strategy fits {node.format_node()}")
        node.meta["autopar.strategy"] = best
        node.meta["autopar.layout"] = best.output
        chosen[node] = best
    return chosen


def estimate_cost(gm, chosen: dict, pricer: Pricer):
    """A rough step time and memory for a propagated plan: compute shares, every input
    redistribution counted for forward and backward, parameters and gradients in memory."""
    from .plans import Cost
    compute_s = sum(pricer.compute_s(s.spec.flops, s.output) for s in chosen.values())
    comm_s = 0.0
    for node, strat in chosen.items():
        for src, need in zip(tensor_inputs(node), strat.inputs):
            num_bytes = _value_bytes(src)
            comm_s += 2 * pricer.redistribute_s(num_bytes, src.meta["autopar.layout"], need)
            for axis, (p, q) in enumerate(zip(need, strat.output)):
                if isinstance(p, Replicate) and not isinstance(q, Replicate):  # gradient sum
                    partial = tuple(Partial() if i == axis else x for i, x in enumerate(need))
                    comm_s += pricer.redistribute_s(num_bytes, partial, need)
    memory = 0.0
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            val = node.meta["val"]
            local = _value_bytes(node) * _fraction(node.meta["autopar.layout"], pricer.mesh)
            memory += local * (2 if val.requires_grad else 1)
    return Cost(compute_s + comm_s, compute_s, comm_s, memory)
