"""annotate_shapes: record the shape and dtype of every value, without real memory."""

from __future__ import annotations

import torch
from torch.fx import Interpreter

from autopar._torch import fake_tensor_mode
from autopar.errors import CaptureError
from autopar.program.graph import fetch_attr, where


def annotate_shapes(gm, ctx):
    """Propagate FakeTensors through the graph (meta-device models included).

    Reads the example inputs in ``ctx``; writes ``node.meta["val"]`` (a FakeTensor, a tuple of
    them, or a Python value for size queries).
    """
    _, fake_mode = fake_tensor_mode()
    mode = fake_mode(allow_non_fake_inputs=True)
    with mode:
        inputs = [_fake(x) for x in ctx.example_inputs]
        attrs = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                attrs[node.target] = _fake(fetch_attr(gm, node.target))
        _Prop(gm, attrs).run(*inputs)
    return gm


def annotate_new_nodes(gm) -> bool:
    """Annotate only the nodes that have no ``"val"`` yet (and the output), from the values of
    their inputs, in the FakeTensorMode those were made in. False, with nothing done, when no
    node holds a FakeTensor to find that mode by."""
    known = {n: n.meta["val"] for n in gm.graph.nodes if "val" in n.meta and n.op != "output"}
    fake, _ = fake_tensor_mode()
    mode = next((v.fake_mode for v in known.values() if isinstance(v, fake)), None)
    if mode is None:
        return False
    with mode:
        _Prop(gm, {}).run(initial_env=known)
    return True


def _fake(t):
    if not isinstance(t, torch.Tensor):
        return t
    device = "cpu" if t.device.type == "meta" else t.device
    out = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=device)
    return out.requires_grad_(t.requires_grad) if t.is_floating_point() else out


class _Prop(Interpreter):
    def __init__(self, gm, attrs):
        super().__init__(gm, garbage_collect_values=True)
        self.attrs = attrs

    def get_attr(self, target, args, kwargs):
        return self.attrs[target]

    def run_node(self, n):
        try:
            result = super().run_node(n)
        except Exception as e:
            path, loc = where(n)
            raise CaptureError(
                f"shape propagation failed at {n.format_node()} ({path} {loc}): "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; autopar "
                "needs ops whose output shapes follow from input shapes (no .item(), "
                "nonzero or data-dependent sizes)") from None
        n.meta["val"] = result
        return result
