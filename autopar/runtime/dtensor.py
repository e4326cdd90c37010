"""Take a plan into the user's own module with PyTorch's DTensor APIs, for a training loop
of one's own: tensor parallel by module styles (``parallelize_module``), data parallel and
sharded parameter storage by FSDP2 (``fully_shard``).

``apply(model, plan, device_mesh)`` parallelizes ``model`` in place, as torchtitan's
``apply_tp`` then ``apply_fsdp`` do on a 2-D mesh: module styles on the tensor-parallel
axis first, then ``fully_shard`` over the data axis, one group per repeated block and one
at the root. Which module takes which style, which head counts are divided, and which
groups reshard after forward follow from the plan (:mod:`autopar.runtime.styles` says how).

Data parallel is FSDP2 throughout, as in torchtitan: a group whose parameters the plan
stores whole on the data axis keeps them gathered from forward to backward
(``reshard_after_forward=False``: one all-gather per step, gradients reduce-scattered, as
ZeRO-2); a group holding a parameter the plan stores split there (``S(0)``, FSDP/ZeRO-3)
reshards after forward and gathers again in backward. FSDP2 keeps both split between steps,
which saves memory and changes no number. Gradients are averaged over the data axis.

The caller feeds each rank its slice of the global batch, as torchtitan's loop does with a
sampler per data-parallel rank: :func:`local_inputs` cuts the inputs the plan splits on the
data axis. A loss that is a mean over equal slices then gives one device's gradients.

Plans these APIs cannot express raise :class:`~autopar.PlanError`, every problem listed at
once: pipeline stages, strided splits of fused projections, a parameter split where no
module style splits it (a norm, transformers' Conv1D, stacked experts), two tensor-parallel
axes, inputs split other than on the batch, ops split over an axis where nothing else is
(context parallel), a mesh unlike ``device_mesh``. ``autopar.compile``'s ParallelModule runs
any plan. Recompute choices and micro-batches are the training loop's to apply.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from ..errors import PlanError
from ..program.placement import is_shard
from .styles import HEAD_COUNTS, ModuleStyle, Styles, module_styles

__all__ = ["apply", "apply_tp", "apply_fsdp", "local_inputs", "module_styles", "Styles",
           "ModuleStyle", "HEAD_COUNTS"]


def apply(model: nn.Module, plan, device_mesh=None) -> nn.Module:
    """``model`` parallelized in place for ``plan`` with DTensor's module styles and FSDP2
    (the module docstring says how), and returned.

    ``device_mesh`` is a DeviceMesh of the plan's shape and axis names; None builds one
    with ``init_device_mesh`` on the current process group. Each rank then feeds its slice
    of the batch (:func:`local_inputs`) and steps any torch optimizer over
    ``model.parameters()``, DTensors where split. Raises PlanError, naming each parameter
    or op and its layout, where the plan cannot be expressed this way.
    """
    styles = module_styles(model, plan)
    device_mesh = _device_mesh(plan, device_mesh)
    if styles.unmapped:
        warnings.warn(styles.unmapped_note(), stacklevel=2)
    if styles.tensor_axis:
        apply_tp(model, device_mesh[styles.tensor_axis], styles)
    if styles.data_axis:
        apply_fsdp(model, device_mesh[styles.data_axis], styles)
    return model


def apply_tp(model: nn.Module, tp_mesh, styles: Styles) -> None:
    """Parallelize ``styles.modules`` over ``tp_mesh``, set the head counts per rank, and
    tie again the parameters that modules shared."""
    from torch.distributed.tensor.parallel import parallelize_module
    parallelize_module(model, tp_mesh, {path: s.parallel_style()
                                        for path, s in styles.modules.items()})
    for path, counts in styles.heads.items():
        for attr, n in counts.items():
            setattr(model.get_submodule(path), attr, n)
    for names in styles.tied:   # a style gives its module a parameter of its own
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, first)


def apply_fsdp(model: nn.Module, dp_mesh, styles: Styles) -> None:
    """``fully_shard`` each group of ``styles.shard_groups`` over ``dp_mesh``, blocks first,
    the root last, each parameter split on its dim of ``styles.shard_dims`` (else 0)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    dims = {id(model.get_parameter(fqn)): d for fqn, d in styles.shard_dims.items()}

    def placement(param):
        return Shard(dims[id(param)]) if id(param) in dims else None

    for path, reshard in styles.shard_groups.items():
        module = model.get_submodule(path) if path else model
        fully_shard(module, mesh=dp_mesh, reshard_after_forward=reshard,
                    shard_placement_fn=placement)


def local_inputs(plan, inputs: dict, device_mesh=None) -> dict:
    """``inputs`` (name -> the whole batch's tensor) as this rank feeds them to a model
    :func:`apply` parallelized: each cut on the dims the plan splits it on (the batch, on the
    data axis), this rank's piece. Without ``device_mesh``, ranks lie on the plan's mesh in
    order, as ``init_device_mesh`` lays them."""
    shape = list(plan.op_mesh.values())
    coords = None if device_mesh is not None else \
        torch.unravel_index(torch.tensor(dist.get_rank()), shape)
    out = {}
    for name, x in inputs.items():
        for i, (axis, p) in enumerate(zip(plan.op_mesh, plan.inputs.get(name, ()))):
            if is_shard(p) and isinstance(x, torch.Tensor):
                k = device_mesh.get_local_rank(axis) if coords is None else int(coords[i])
                x = x.chunk(shape[i], p.dim)[k]
        out[name] = x
    return out


def _device_mesh(plan, device_mesh):
    shape, names = tuple(plan.mesh.values()), tuple(plan.mesh)
    if device_mesh is None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != plan.world_size:
            raise PlanError(f"the plan is for {plan.world_size} devices (mesh {plan.mesh}) "
                            f"but the process group has {world}: plan for {world}, or "
                            f"launch {plan.world_size} processes")
        from torch.distributed.device_mesh import init_device_mesh
        return init_device_mesh(_device_type(), shape, mesh_dim_names=names)
    got_names = tuple(device_mesh.mesh_dim_names or ())
    if got_names != names or tuple(device_mesh.shape) != shape:
        got = dict(zip(got_names or range(device_mesh.ndim), device_mesh.shape))
        raise PlanError(f"device_mesh {got} does not match the plan's mesh {plan.mesh}: "
                        f"build it as init_device_mesh(device, {shape}, mesh_dim_names="
                        f"{names}), or pass device_mesh=None")
    return device_mesh


def _device_type() -> str:
    if dist.get_backend() == "gloo" or not torch.accelerator.is_available():
        return "cpu"
    return torch.accelerator.current_accelerator().type
