"""Every private PyTorch name autopar uses, each wrapped here once with the torch versions it
was checked against (2.13; the names exist unchanged since 2.5, which pyproject requires).
Public APIs come first: a name is here only where torch has no public equivalent. Modules
that are costly to import (Dynamo, functional collectives, FakeTensor) are imported where
first used, so that ``import autopar`` stays cheap."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

# Pytrees: torch has no public module for them (torch.utils._pytree is what DTensor, fx and
# torch.export use); flatten and map nested structures of tensors.
# A dispatch mode sees every aten op (memory measurement); private, with no public twin.
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: F401
from torch.utils._pytree import (keystr, tree_flatten, tree_flatten_with_path,  # noqa: F401
                                 tree_leaves, tree_map, tree_unflatten)

# Dynamo's graph of a torch.autograd.Function's forward and backward turns gradients off and
# on with this call; reading those graphs means knowing it.
SET_GRAD_ENABLED = torch._C._set_grad_enabled


def default_store() -> dist.Store:
    """The key-value store of the default process group: the one ``init_process_group``
    rendezvoused through, which every rank of the group reaches, with the group's timeout as
    its own.

    torch.distributed has no public accessor for it; ``distributed_c10d._get_default_store``
    is what its own helpers use.
    """
    return dist.distributed_c10d._get_default_store()


def fake_tensor_mode():
    """``torch._subclasses.fake_tensor``: (FakeTensor, FakeTensorMode), shapes and dtypes
    propagated with no real memory (torch.fx's own ShapeProp and torch.export use them)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    return FakeTensor, FakeTensorMode


def functional_collectives():
    """``torch.distributed._functional_collectives``: collectives as traceable ops returning
    tensors (DTensor and torch.compile use them); the module is private in every release."""
    import torch.distributed._functional_collectives as funcol
    return funcol


def lazy_graph_module(root, graph, name: str):
    """A GraphModule that writes its code when first read, not at each ``recompile()``
    (``torch.fx._lazy_graph_module``, what Dynamo hands backends), or a plain one where the
    private class is gone."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:
        return torch.fx.GraphModule(root, graph, name)
    return _LazyGraphModule(root, graph, name)


@contextlib.contextmanager
def dynamo_ignoring(functions: set):
    """Dynamo told to skip calls to ``functions`` (logging) under fullgraph: the config
    patch ``torch._dynamo.config.ignore_logging_functions``, which has no public form."""
    import torch._dynamo
    with torch._dynamo.config.patch(ignore_logging_functions=functions):
        yield


def register_dynamo_backend(fn, name: str) -> None:
    """``torch._dynamo.register_backend``: the registration torch.compile documents for custom
    backends (under a private module), unless a backend of that name is listed already."""
    from torch._dynamo import list_backends, register_backend
    if name not in list_backends(exclude_tags=()):
        register_backend(fn, name=name)


def at_end_of_backward(callback) -> None:
    """Run ``callback`` when the current backward pass finishes
    (``Variable._execution_engine.queue_callback``, how DDP and FSDP run code at the end of
    backward; private, checked against torch 2.5 through 2.13)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def in_backward() -> bool:
    """Whether autograd's engine is running a backward pass on this thread
    (``torch._C._current_graph_task_id``, -1 outside one)."""
    return torch._C._current_graph_task_id() != -1


# Where torch's own ops live for the rules' canonical names (``torch._C._nn.linear`` is what
# F.linear calls and Dynamo records).
NN_OPS = torch._C._nn


def init_optimizer_state(optimizer) -> None:
    """Make an optimizer's states where it has none yet (a step on zero gradients at zero
    learning rate), so that a checkpoint's states can load into them.

    ``torch.distributed.checkpoint.state_dict._init_optim_state`` is what that module's
    public ``get_optimizer_state_dict`` and ``set_optimizer_state_dict`` do first; it has no
    public twin.
    """
    from torch.distributed.checkpoint.state_dict import _init_optim_state
    _init_optim_state(optimizer)
