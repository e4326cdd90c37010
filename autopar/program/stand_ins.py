"""Stand-ins for a meta-device model while Dynamo traces it."""

from __future__ import annotations

import contextlib

import torch

from .._torch import fake_tensor_mode


@contextlib.contextmanager
def off_meta(model, flat_inputs):
    """Where the model or its inputs are on the meta device, FakeTensors on the CPU in their
    place while Dynamo traces (no memory either): Dynamo makes some tensors the model creates
    (a cache's first, empty keys) real ones on the model's device, which meta ones cannot
    meet. Yields (the inputs to trace on, id of each stand-in -> the tensor it stands for);
    the model's own tensors are back on leaving."""
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    held = [v for m in modules for table in (m._parameters, m._buffers, m.__dict__)
            for v in table.values()]
    if not any(isinstance(t, torch.Tensor) and t.is_meta for t in (*flat_inputs, *held)):
        yield flat_inputs, {}
        return
    _, fake_mode = fake_tensor_mode()
    mode = fake_mode(allow_non_fake_inputs=True)
    made, originals, swapped = {}, {}, []

    def stand_in(t):
        if not (isinstance(t, torch.Tensor) and t.is_meta):
            return t
        if id(t) not in made:
            with mode:
                fake = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype,
                                           device="cpu")
            if isinstance(t, torch.nn.Parameter):
                fake = torch.nn.Parameter(fake, requires_grad=t.requires_grad)
            made[id(t)], originals[id(fake)] = fake, t
        return made[id(t)]

    for m in modules:   # parameters, buffers and plain tensor attributes
        for table in (m._parameters, m._buffers, m.__dict__):
            for name, value in list(table.items()):
                if isinstance(value, torch.Tensor) and value.is_meta and \
                        (table is not m.__dict__ or not name.startswith("_")):
                    swapped.append((table, name, value))
                    table[name] = stand_in(value)
    try:
        yield [stand_in(t) for t in flat_inputs], originals
    finally:
        for table, name, value in swapped:
            table[name] = value
