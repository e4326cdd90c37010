"""What the user asks is one frozen Options value, checked before anything is traced."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import autopar
from autopar import PlanError
from autopar.options import Options


@pytest.mark.parametrize("kwargs, message", [
    (dict(level="best"), "level='best'"),
    (dict(precision="fp8"), "precision='fp8'"),
    (dict(optimizer="lion"), "optimizer='lion'"),
    (dict(micro_batches=0), "micro_batches=0"),
    (dict(micro_batches=True), "micro_batches=True"),
    (dict(memory_budget_bytes=-1), "memory_budget_bytes=-1"),
    (dict(recompute="sometimes"), "'sometimes'.*none, selective, full"),
    (dict(recompute={"layers.*": "most"}), r"recompute\['layers.\*'\] = 'most'"),
    (dict(mesh={"dp": 0}), "axis 'dp' of size 0"),
    (dict(mesh={"dp": 4, "pp": 2}), "'pp' is the outermost.*{'pp': 2, 'dp': 4}"),
    (dict(mesh={"stage": 2, "dp": 4}), "'stage'.*pipeline stages: name that axis 'pp'"),
    (dict(schedule="zb"), "schedule='zb'.*gpipe, 1f1b, interleaved-1f1b"),
    (dict(schedule="interleaved-1f1b-v1"), "at least 2 chunks"),
    (dict(stages=(2, 0)), r"stages=\(2, 0\)"),
    (dict(constraints=["fc1.weight"]), "constraints=\\['fc1.weight'\\]"),
    (dict(fold="yes"), "fold='yes'"),
])
def test_bad_options_are_refused_naming_the_value(kwargs, message):
    with pytest.raises(PlanError, match=message):
        Options(**kwargs)


def test_options_are_frozen_and_their_pins_copied():
    pins = {"fc1.weight": "RS(0)"}
    o = Options(constraints=pins, mesh={"dp": 2, "tp": 2})
    pins["fc2.weight"] = "R"
    assert dict(o.constraints) == {"fc1.weight": "RS(0)"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.level = "fast"
    with pytest.raises(TypeError):
        o.constraints["x"] = "R"
    assert o.replace(micro_batches=2).micro_batches == 2 and o.micro_batches is None
    assert Options(**o.as_kwargs()) == o


def test_a_bad_option_stops_compile_before_the_model_is_traced(monkeypatch):
    traced = []
    monkeypatch.setattr("autopar.api.capture", lambda *a, **k: traced.append(1))
    net = torch.nn.Linear(4, 4)
    with pytest.raises(PlanError, match="outermost"):
        autopar.compile(net, autopar.Cluster.local(4, measure=False),
                        example_inputs=(torch.randn(2, 4),), mesh={"dp": 2, "pp": 2})
    with pytest.raises(PlanError, match="micro_batches=0"):
        autopar.plan(net, autopar.Cluster.local(4, measure=False),
                     example_inputs=(torch.randn(2, 4),), micro_batches=0)
    assert not traced


def test_a_replicated_pin_means_replicated_on_any_mesh():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    p = autopar.plan(net, autopar.Cluster.local(4, measure=False),
                     example_inputs=(torch.randn(8, 8),), mesh={"dp": 2, "tp": 2},
                     constraints={"*.weight": "R"})
    assert all(layout == (autopar.Replicate(),) * 2
               for fqn, layout in p.placements.items() if fqn.endswith("weight"))


def test_what_a_name_is_pinned_to_is_read_off_the_last_glob_naming_it():
    o = Options(constraints={"*.weight": "R", "fc1.weight": "RS(0)"},
                storage={"fc*.weight": "S(0)R"})
    assert o.pins_of("fc1.weight") == ("RS(0)", "S(0)R")
    assert o.pins_of("fc2.bias") == (None, None)
    assert o.pinned("fc1.weight") == "use, storage"
    assert o.pinned("out.weight") == "use" and o.pinned("fc2.bias") == ""
