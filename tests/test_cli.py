"""The `autopar` command line as a user runs it: `autopar plan` on a zoo model from its file
and on a transformers config saves a plan every parameter has a placement in, `explain` and
`report` read it back, and every user error is one message naming the bad value, with a
nonzero status and no traceback.

The plans run as subprocesses (`python -m autopar`, as the `autopar` script does); the error
paths and `--help` call :func:`autopar.cli.main` in this process, which is the script's
whole body, to keep the file fast.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import autopar
from autopar import Replicate, Shard
from autopar.cli import _materialize, main
from autopar.cli_models import CommandError, example_inputs

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = str(ROOT / "examples" / "models.py")
CLUSTER = "g4dn.12xlarge"      # a preset of 4 devices: nothing to measure
TINY_LLAMA = ["--arg", "num_hidden_layers=2", "--arg", "hidden_size=32",
              "--arg", "intermediate_size=64", "--arg", "num_attention_heads=4",
              "--arg", "num_key_value_heads=2", "--arg", "vocab_size=128",
              "--arg", "max_position_embeddings=16"]


def autopar_cli(*args, cwd):
    """``python -m autopar ARGS`` in ``cwd``, in this process's environment."""
    return subprocess.run([sys.executable, "-m", "autopar", *map(str, args)], cwd=cwd,
                          env=dict(os.environ), capture_output=True, text=True, timeout=300,
                          check=False)


def assert_ok(done):
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def gpt_plan(tmp_path_factory):
    """A 3-layer zoo GPT planned on 4 devices, the MLP's first matmul pinned column-parallel
    on tp; (the finished process, the plan file)."""
    folder = tmp_path_factory.mktemp("cli")
    done = autopar_cli("plan", f"{MODELS}:GPT", "--arg", "n_layer=3", "--cluster", CLUSTER,
                       "--mesh", "dp=2,tp=2", "--constraint", "h.*.mlp.c_fc.weight=RS(0)",
                       "--level", "fast", "-o", "gpt.json", "--report", "drawn.html",
                       cwd=folder)
    return done, folder / "gpt.json"


def test_plan_builds_the_zoo_gpt_from_its_config_and_saves_every_parameter(gpt_plan):
    from models import GPT, GPTConfig
    done, path = gpt_plan
    assert_ok(done)
    plan = autopar.Plan.from_json(path.read_text())
    assert plan.world_size == autopar.Cluster.preset(CLUSTER).world_size == 4
    assert plan.mesh == {"dp": 2, "tp": 2}
    with torch.device("meta"):
        names = {n for n, _ in GPT(GPTConfig(n_layer=3)).named_parameters()}
    assert "h.2.mlp.c_fc.weight" in names     # --arg n_layer=3 reached GPTConfig
    assert names <= set(plan.placements)
    assert plan.placements["h.1.mlp.c_fc.weight"] == (Replicate(), Shard(0))
    assert plan.pinned["h.1.mlp.c_fc.weight"] == "use"
    assert set(plan.inputs) == {"idx", "targets"}   # targets: forward takes them
    assert "autopar plan: mesh dp=2 x tp=2" in done.stdout
    assert "plan saved to gpt.json, drawn in drawn.html" in done.stdout
    assert "h.0.mlp.c_fc.weight" in (path.parent / "drawn.html").read_text()


def test_explain_prints_the_saved_plan(gpt_plan, capsys):
    _, path = gpt_plan
    done = autopar_cli("explain", path.name, cwd=path.parent)
    assert_ok(done)
    assert "mesh dp=2 x tp=2" in done.stdout
    assert "h.0.mlp.c_fc.weight" in done.stdout and "wte.weight" in done.stdout
    status, per_op, _ = run_main(capsys, "explain", path, "--per", "op")
    assert status == 0
    assert "linear" in per_op and "wte.weight" not in per_op


def test_report_writes_the_saved_plan_as_a_page(gpt_plan):
    _, path = gpt_plan
    done = autopar_cli("report", path.name, "-o", "gpt.html", cwd=path.parent)
    assert_ok(done)
    page = (path.parent / "gpt.html").read_text()
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert "h.0.mlp.c_fc.weight" in page


def test_plan_builds_a_transformers_llama_from_its_model_type(tmp_path):
    transformers = pytest.importorskip("transformers")
    done = autopar_cli("plan", "hf:llama", *TINY_LLAMA, "--cluster", CLUSTER, "--batch", 4,
                       "--seq", 8, "--level", "fast", cwd=tmp_path)
    assert_ok(done)
    plan = autopar.Plan.from_json((tmp_path / "plan.json").read_text())
    assert plan.world_size == 4
    config = transformers.LlamaConfig(**{a.split("=")[0]: int(a.split("=")[1])
                                         for a in TINY_LLAMA[1::2]})
    with torch.device("meta"):
        names = {n for n, _ in transformers.LlamaForCausalLM(config).named_parameters()}
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert names <= set(plan.placements)
    assert set(plan.inputs) == {"input_ids", "labels"}
    assert "Traceback" not in done.stderr


# -- example inputs ------------------------------------------------------------------------

def test_token_models_get_ids_below_the_first_embedding_and_targets():
    from models import GPT, MLP, GPTConfig
    with torch.device("meta"):
        gpt = GPT(GPTConfig(vocab_size=50))
        mlp = MLP()
    tokens, targets = example_inputs(gpt, batch=4, seq=None)
    assert tokens.shape == (4, GPTConfig().block_size)   # --seq cut to the block size
    assert tokens.dtype == torch.int64 and tokens.device.type == "meta"
    assert targets.shape == tokens.shape
    with pytest.raises(CommandError, match="--inputs"):
        example_inputs(mlp, batch=4, seq=8)


def test_a_meta_model_moved_to_the_cpu_keeps_its_tied_weights():
    from models import GPT, GPTConfig
    with torch.device("meta"):
        gpt = GPT(GPTConfig())
    _materialize(gpt)
    assert gpt.wte.weight.device.type == "cpu"
    assert gpt.lm_head.weight is gpt.wte.weight
    assert all(p.device.type == "cpu" for p in gpt.parameters())


# -- errors and help, in this process --------------------------------------------------------

@pytest.fixture
def model_file(tmp_path, monkeypatch):
    """A model file of a config-built module; what loading it adds to sys.path and
    sys.modules is undone after."""
    path = tmp_path / "cli_case_model.py"
    path.write_text(textwrap.dedent("""
        from dataclasses import dataclass
        import torch.nn as nn

        @dataclass
        class Config:
            vocab: int = 32
            width: int = 16
            max_seq_len: int = 64

        class Net(nn.Module):
            def __init__(self, cfg: Config = Config()):
                super().__init__()
                self.cfg = cfg
                self.embed = nn.Embedding(cfg.vocab, cfg.width)
                self.out = nn.Linear(cfg.width, cfg.vocab)

            def forward(self, tokens):
                return self.out(self.embed(tokens))
        """))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield path
    sys.modules.pop("cli_case_model", None)


def run_main(capsys, *args):
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


@dataclasses.dataclass
class Case:
    args: tuple
    status: int
    names: tuple       # what the message must name


def error_cases(model):
    return {
        "missing file": Case(("plan", "no_such_model.py:Net", "--cluster", CLUSTER), 1,
                             ("no_such_model.py", "not found")),
        "bad class name": Case(("plan", f"{model}:Nett", "--cluster", CLUSTER), 1,
                               ("'Nett'", "closest: 'Net'")),
        "not a model": Case(("plan", f"{model}:Config", "--cluster", CLUSTER), 1,
                            ("Config", "not a model")),
        "unknown preset": Case(("plan", f"{model}:Net", "--cluster", "dgx-a1000"), 1,
                               ("'dgx-a1000'", "dgx-a100", "p4d.24xlarge", "local:N")),
        "bad --arg field": Case(("plan", f"{model}:Net", "--arg", "widht=8", "--cluster",
                                 CLUSTER), 1, ("'widht'", "Config", "closest: 'width'")),
        "bad --arg syntax": Case(("plan", f"{model}:Net", "--arg", "width", "--cluster",
                                  CLUSTER), 2, ("--arg 'width'", "KEY=VALUE")),
        "bad layout": Case(("plan", f"{model}:Net", "--cluster", CLUSTER, "--constraint",
                            "out.weight=RX(0)"), 2, ("'RX(0)'", "S(dim)")),
        "bad memory size": Case(("plan", f"{model}:Net", "--cluster", CLUSTER,
                                 "--memory-budget", "16XB"), 2, ("'16XB'", "16GiB")),
        "bad mesh": Case(("plan", f"{model}:Net", "--cluster", CLUSTER, "--mesh", "dp=3"), 1,
                         ("dp", "3", "4 devices")),
        "seq past the config": Case(("plan", f"{model}:Net", "--cluster", CLUSTER, "--seq",
                                     "100"), 1, ("--seq 100", "--arg max_seq_len=100")),
        "missing plan": Case(("explain", "no_such_plan.json"), 1, ("no_such_plan.json",
                                                                   "autopar plan")),
    }


@pytest.mark.parametrize("case", list(error_cases("m.py")))
def test_a_user_error_is_one_message_naming_the_value(case, model_file, capsys):
    c = error_cases(model_file)[case]
    status, _, err = run_main(capsys, *c.args)
    assert status == c.status, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"autopar {c.args[0]}: error:")
    for name in c.names:
        assert name in message


def test_a_user_error_exits_nonzero_without_traceback_from_the_shell(tmp_path):
    done = autopar_cli("plan", "no_such_model.py:Net", "--cluster", CLUSTER, cwd=tmp_path)
    assert done.returncode == 1
    assert "no_such_model.py" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "plan.json").exists()


def test_debug_shows_the_traceback(model_file, capsys):
    status, _, err = run_main(capsys, "plan", f"{model_file}:Nett", "--cluster", CLUSTER,
                              "--debug")
    assert status == 1 and "Traceback" in err


def test_a_model_built_from_a_file_is_planned_in_process(model_file, tmp_path, capsys):
    out_path = tmp_path / "net.json"
    status, _, err = run_main(capsys, "plan", f"{model_file}:Net", "--arg", "width=8",
                                "--cluster", CLUSTER, "--level", "fast", "--batch", 4,
                                "--seq", 4, "-o", out_path)
    assert status == 0, err
    plan = autopar.Plan.from_json(out_path.read_text())
    assert {"embed.weight", "out.weight", "out.bias"} <= set(plan.placements)
    assert plan.world_size == 4


@pytest.mark.parametrize("command, names", [
    ((), ("plan", "explain", "report", "examples:")),
    (("plan",), ("MODEL", "--cluster", "--arg", "--mesh", "--constraint", "--storage",
                 "--recompute", "--memory-budget", "hf:", "--inputs", "examples:")),
    (("explain",), ("PLAN.json", "--per", "examples:")),
    (("report",), ("PLAN.json", "--output", "examples:")),
])
def test_help_describes_each_command(command, names, capsys):
    status, out, _ = run_main(capsys, *command, "--help")
    assert status == 0
    for name in names:
        assert name in out


def test_planning_reports_each_mesh_planned_to_the_command_lines_display():
    """While the command line shows its display, the planner tells it how many of its
    programs (one per candidate mesh) it has planned instead of drawing a bar of its own."""
    from autopar.search.meshes import PROGRESS
    from models import GPT, GPTConfig, tiny_batch
    seen = []
    cfg = GPTConfig()
    token = PROGRESS.set(lambda label, done, total: seen.append((label, done, total)))
    try:
        autopar.plan(GPT(cfg), autopar.Cluster.local(4, measure=False),
                     example_inputs=tiny_batch(cfg))
    finally:
        PROGRESS.reset(token)
    assert len(seen) >= 2 and all(0 <= done < total for _, done, total in seen)
    assert {label for label, _, _ in seen} >= {"mesh {dp: 4}", "mesh {dp: 2, tp: 2}"}


def test_a_transformers_config_takes_a_field_it_does_not_declare_with_a_note(capsys):
    """T5 reads config.decoder_start_token_id, which T5Config does not declare: set as given,
    and said, in case it is a typo."""
    import transformers

    from autopar.cli_models import _hf_config
    config, model_cls = _hf_config(transformers, "t5", {"decoder_start_token_id": 0,
                                                        "num_layers": 2})
    assert config.decoder_start_token_id == 0 and config.num_layers == 2 and model_cls is None
    err = capsys.readouterr().err
    assert "declares no field 'decoder_start_token_id'" in err and "num_layers" not in err
