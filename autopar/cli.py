"""autopar's command line: ``autopar plan``, ``autopar explain`` and ``autopar report``.

``autopar plan MODEL --cluster CLUSTER`` builds the model (on the meta device: no memory for
its weights; :mod:`autopar.cli_models` says how a model, its example inputs and the cluster
are found), plans it with :func:`autopar.plan`, prints ``plan.explain()`` and saves the plan
as JSON. ``autopar explain PLAN.json`` prints a saved plan again; ``autopar report PLAN.json``
draws it as a self-contained HTML page.

Exit status: 0 done; 1 a value that cannot be used (a file or name not found, an unknown
preset, a model autopar cannot plan); 2 a command line that cannot be read (argparse's own
errors, a malformed ``KEY=VALUE``, size or layout). Every error is one message on stderr
naming the value and a remedy; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import textwrap
import traceback

from torch import nn

from .cli_models import (CommandError, UsageError, example_inputs, load_cluster,
                         load_inputs_function, load_model, parse_assignments)
from .cost.hardware import PRESETS
from .cost.model import OPTIMIZERS, PRECISIONS
from .errors import AutoparError, CaptureError, PlanError
from .options import LEVELS, RECOMPUTE_CHOICES, Options
from .program.placement import parse_layout
from .units import format_bytes

PROG = "autopar"
# --memory-budget's units: decimal and binary multiples of a byte
BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

TOP_EPILOG = """\
examples:
  autopar plan examples/models.py:GPT --arg n_layer=4 --cluster p3.8xlarge -o plan.json
  autopar plan hf:llama --arg num_hidden_layers=2 --cluster dgx-a100 --nodes 2 --batch 16
  autopar explain plan.json --per op
  autopar report plan.json -o plan.html

`autopar COMMAND --help` lists a command's options."""

PLAN_EPILOG = f"""\
MODEL is one of
  path/to/file.py:Name    a class or function in that file (its folder goes on sys.path)
  package.module:Name     the same, imported
  hf:NAME                 a transformers model with random weights, nothing downloaded:
                          a model type (hf:llama), a config or model class
                          (hf:LlamaConfig, hf:LlamaForCausalLM) or hf:path/to/config.json
A module class is constructed with the --arg values as its arguments or, where its
constructor takes one config object (GPT(GPTConfig(...))), as that config's fields; a
function is called with them and returns the module; for hf: they override the config.
Values are Python literals (4, 0.1, True, (3, 5)), anything else a string. The model is
built on the meta device; a model that cannot be captured there is built again in
uninitialized CPU memory (its values do not matter to a plan), or with --device cpu.

Example inputs, for --batch B (default 8) and --seq S (default 128, cut to the longest
sequence the model's config states):
  1. --inputs FILE.py:FUNCTION, called as FUNCTION(model, B, S) under the model's device,
     returning a tuple (positional inputs) or a dict (keyword inputs);
  2. else a function example_inputs(model, B, S) in the model's own file;
  3. else token ids of shape (B, S), int64, below the vocabulary of a transformers model
     or of the model's first nn.Embedding, passed as the labels too where forward takes
     `labels` or `targets` (a transformers vision model: images and labels);
  4. else an error asking for --inputs.

CLUSTER is a preset (--nodes N of it), a YAML or JSON cluster file, or local:N (this
machine as N processes, measured once and cached). The presets:
{textwrap.fill(", ".join(sorted(PRESETS)), 88, initial_indent="  ", subsequent_indent="  ")}

examples:
  autopar plan examples/models.py:GPT --arg n_layer=4 --cluster p3.8xlarge
  autopar plan examples/models.py:Llama --cluster dgx-a100 --nodes 2 --batch 32 \\
      --mesh dp=4,tp=4 --constraint 'layers.*.attention.wq.weight=RS(0)' --level fast
  autopar plan hf:llama --arg num_hidden_layers=2 --arg hidden_size=256 \\
      --cluster g5.48xlarge --precision bf16-mixed --memory-budget 16GiB -o llama.json
  autopar plan my_model.py:build --inputs my_model.py:batch --cluster cluster.yaml"""

EXPLAIN_EPILOG = """\
examples:
  autopar explain plan.json              every parameter's layout and what each mesh axis does
  autopar explain plan.json --per op     every op's layouts, compute, communication, memory
  autopar explain plan.json --per block  the same summed per block (h.0, layers.3)"""

REPORT_EPILOG = """\
examples:
  autopar report plan.json -o plan.html
  autopar report plan.json               writes plan.html beside plan.json"""


def main(argv=None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:   # --help, or argparse's own error (status 2)
        return e.code if isinstance(e.code, int) else 0
    if ns.command is None:
        parser.print_help()
        return 2
    if not ns.debug:   # torch logs the errors it raises (Dynamo, FakeTensor): one message is ours
        logging.getLogger("torch").setLevel(logging.CRITICAL)
    try:
        return ns.run(ns)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # the reader of stdout went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # noqa: BLE001 - every error becomes one message and a status
        if ns.debug:
            traceback.print_exc()
        sys.stderr.write(f"{PROG} {ns.command}: error: {_message(e, ns.debug)}\n")
        return e.status if isinstance(e, CommandError) else 1


def _message(e: Exception, debug: bool) -> str:
    """One line for ``e``: an error in the user's values as it says it; an error raised
    inside the model's code, transformers or autopar with its type and where to see more."""
    if isinstance(e, (CommandError, AutoparError)):
        text, traced = str(e), isinstance(e, CommandError) and e.__cause__ is not None
    else:
        text, traced = f"{type(e).__name__}: {e}", True
    return text + (" (--debug shows the traceback)" if traced and not debug else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TOP_EPILOG,
        description="autopar plans how a PyTorch model is split over a cluster of devices: "
                    "the mesh,\na layout for every parameter, input and op, and the "
                    "predicted step time and memory.")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the traceback of an error")
    _plan_parser(sub, common)
    explain = sub.add_parser(
        "explain", parents=[common], help="print a saved plan", epilog=EXPLAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print a plan saved by `autopar plan` as a table, with its predicted "
                    "cost.")
    explain.add_argument("plan", metavar="PLAN.json", help="a plan saved by autopar plan")
    _per_argument(explain)
    explain.set_defaults(run=_explain)
    report = sub.add_parser(
        "report", parents=[common], help="draw a saved plan as an HTML page",
        epilog=REPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a self-contained HTML report of a plan saved by `autopar plan`.")
    report.add_argument("plan", metavar="PLAN.json", help="a plan saved by autopar plan")
    report.add_argument("-o", "--output", metavar="FILE.html",
                        help="where to write it (default: PLAN with .html for .json)")
    report.set_defaults(run=_report)
    return parser


def _plan_parser(sub, common):
    p = sub.add_parser(
        "plan", parents=[common], help="plan a model for a cluster", epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plan MODEL for CLUSTER without running it: print the plan and save it "
                    "as JSON.")
    p.add_argument("model", metavar="MODEL",
                   help="FILE.py:NAME, package.module:NAME or hf:NAME (below)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument of the model's class, function or config (repeatable)")
    p.add_argument("-c", "--cluster", required=True, metavar="CLUSTER",
                   help="a preset, a YAML/JSON cluster file, or local:N (below)")
    p.add_argument("--nodes", type=_positive_int, metavar="N",
                   help="machines of a preset (default 1)")
    p.add_argument("--devices-per-node", type=_positive_int, metavar="K",
                   help="use only the first K devices of each preset machine")
    inputs = p.add_argument_group("example inputs")
    inputs.add_argument("--batch", type=_positive_int, default=8, metavar="B",
                        help="global batch size (default 8)")
    inputs.add_argument("--seq", type=_positive_int, metavar="S",
                        help="sequence length (default 128, cut to the model's limit)")
    inputs.add_argument("--inputs", metavar="FILE.py:FUNCTION",
                        help="a function (model, batch, seq) returning the example inputs")
    inputs.add_argument("--device", choices=("meta", "cpu"), default="meta",
                        help="where the model is built (default meta: no memory)")
    opts = p.add_argument_group("planning (autopar.plan's options)")
    opts.add_argument("--mesh", type=_mesh, metavar="AXIS=SIZE,...",
                      help="pin the mesh, outer to inner, e.g. dp=2,tp=4 (pp outermost)")
    opts.add_argument("--level", choices=LEVELS, default="full",
                      help="full: the exact integer program (default); fast: greedy")
    opts.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                      help="what a training step computes in (default fp32)")
    opts.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw",
                      help="whose states each parameter holds (default adamw)")
    opts.add_argument("--memory-budget", type=_bytes, metavar="SIZE",
                      help="memory per device, e.g. 16GiB or 40GB (default: the device's)")
    opts.add_argument("--micro-batches", type=_positive_int, metavar="M",
                      help="run the batch as M micro-batches (default: the planner's)")
    opts.add_argument("--stages", type=_stages, metavar="L1,L2,...",
                      help="layers per pipeline stage, e.g. 3,5 (with a pp mesh axis)")
    opts.add_argument("--schedule", metavar="NAME",
                      help="pipeline schedule: gpipe, 1f1b, interleaved-1f1b[-vK]")
    opts.add_argument("--recompute", action="append", default=[], metavar="[GLOB=]CHOICE",
                      help=f"recompute blocks: {', '.join(RECOMPUTE_CHOICES)}, for every "
                           "block or those a glob names, e.g. 'layers.*=full' (repeatable)")
    opts.add_argument("--constraint", action="append", default=[], metavar="GLOB=LAYOUT",
                      help="the layout parameters or inputs are used in, e.g. "
                           "'h.*.mlp.c_fc.weight=RS(0)' (repeatable)")
    opts.add_argument("--storage", action="append", default=[], metavar="GLOB=LAYOUT",
                      help="the layout parameters are held in, e.g. '*.weight=S(0)R' "
                           "(repeatable)")
    opts.add_argument("--no-fold", action="store_true",
                      help="plan every repeated layer on its own")
    opts.add_argument("-v", "--verbose", action="store_true", help="show the solver's log")
    out = p.add_argument_group("output")
    _per_argument(out)
    out.add_argument("-o", "--output", default="plan.json", metavar="PLAN.json",
                     help="where to save the plan (default plan.json)")
    out.add_argument("--report", metavar="FILE.html",
                     help="also draw the plan as an HTML page there (as `autopar report`)")
    p.set_defaults(run=_plan)


def _per_argument(parser):
    parser.add_argument("--per", choices=("param", "op", "block"), default="param",
                        help="one row per parameter (default), op or block")


# -- commands --------------------------------------------------------------------------------

def _plan(ns) -> int:
    from . import api
    args = parse_assignments(ns.arg, "--arg", "n_layer=4")
    options = _plan_options(ns)
    Options(**options)   # checked before anything is built
    with _Progress(enabled=sys.stdout.isatty()) as progress:
        progress.phase(f"reading the cluster {ns.cluster}")
        cluster = load_cluster(ns.cluster, ns.nodes, ns.devices_per_node)
        progress.phase(f"loading {ns.model}")
        target = load_model(ns.model, args)
        make = _inputs_function(ns.inputs, target)
        progress.phase(f"building {ns.model} on the {ns.device} device")
        model = target.build(ns.device)
        inputs = example_inputs(model, ns.batch, ns.seq, make)
        progress.phase(f"planning {type(model).__name__} for {cluster}")
        try:
            with progress.planner():
                plan = api.plan(model, cluster, inputs, **options)
        except CaptureError as e:
            if ns.device != "meta":
                raise
            model = _off_meta(model, e, ns.model)
            inputs = example_inputs(model, ns.batch, ns.seq, make)
            progress.phase(f"planning {type(model).__name__} for {cluster} (on the CPU)")
            with progress.planner():
                plan = api.plan(model, cluster, inputs, **options)
    try:
        with open(ns.output, "w") as f:
            f.write(plan.to_json())
    except OSError as e:
        raise CommandError(f"cannot write the plan to {ns.output!r}: {e.strerror}; give "
                           "another path with -o") from None
    sys.stdout.write(plan.explain(per=ns.per))
    if ns.report:
        print(f"plan saved to {ns.output}, drawn in {_written(plan, ns.report)}")
    else:
        print(f"plan saved to {ns.output}: `autopar explain {ns.output}` prints it again, "
              f"`autopar report {ns.output}` draws it")
    return 0


def _plan_options(ns) -> dict:
    """``autopar.plan``'s keyword arguments from the command line."""
    recompute = _recompute(ns.recompute)
    return {"mesh": ns.mesh, "constraints": _layouts(ns.constraint, "--constraint"),
            "storage": _layouts(ns.storage, "--storage"), "level": ns.level,
            "memory_budget_bytes": ns.memory_budget, "precision": ns.precision,
            "optimizer": ns.optimizer, "fold": not ns.no_fold, "recompute": recompute,
            "micro_batches": ns.micro_batches, "schedule": ns.schedule, "stages": ns.stages,
            "verbose": ns.verbose}


def _inputs_function(spec, target):
    """The function that makes the example inputs: ``--inputs``, else an ``example_inputs``
    function of the model's module, else None (the token rule)."""
    if spec is not None:
        return load_inputs_function(spec)
    found = getattr(target.module, "example_inputs", None)
    return found if callable(found) else None


def _off_meta(model, error: CaptureError, spec: str):
    """``model`` moved off the meta device after ``error`` capturing it there: into
    uninitialized CPU memory where its weights take at most half of this machine's (the
    capture holds more beside them), else a CommandError."""
    size, memory = _weight_bytes(model), _memory_bytes()
    if memory is None or 2 * size > memory:
        raise CommandError(f"{spec} could not be captured on the meta device, and its "
                           f"{format_bytes(size)} of weights are too many to build here: "
                           f"{error}") from error
    sys.stderr.write(f"{PROG}: {type(model).__name__} could not be captured on the meta "
                     f"device; planning it in uninitialized CPU memory "
                     f"({format_bytes(size)}) instead\n")
    return _materialize(model)


def _materialize(model: nn.Module) -> nn.Module:
    """``model`` moved from the meta device to uninitialized CPU memory (its values do not
    matter to a plan), parameters shared between modules still shared."""
    shared = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    model.to_empty(device="cpu")
    for names in shared.values():
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, first)
    return model


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _memory_bytes() -> int | None:
    """This machine's physical memory, None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _explain(ns) -> int:
    sys.stdout.write(_read_plan(ns.plan).explain(per=ns.per))
    return 0


def _report(ns) -> int:
    plan = _read_plan(ns.plan)
    output = ns.output or os.path.splitext(ns.plan)[0] + ".html"
    print(f"report written to {_written(plan, output)}")
    return 0


def _written(plan, path: str):
    """``plan`` drawn as an HTML page at ``path``; the path written."""
    try:
        return plan.report(path)
    except OSError as e:
        raise CommandError(f"cannot write the report to {path!r}: {e.strerror}; give "
                           "another path") from None


def _read_plan(path: str):
    """The plan saved in ``path`` (``plan.to_json()``), a CommandError where there is none."""
    from .search.result import Plan
    if not os.path.isfile(path):
        raise CommandError(f"plan file {path!r} not found; make one with `autopar plan MODEL "
                           f"--cluster CLUSTER -o {path}`")
    with open(path) as f:
        text = f.read()
    try:
        return Plan.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        raise CommandError(f"{path} is not a plan autopar saved ({type(e).__name__}: {e}); "
                           "make one with `autopar plan MODEL --cluster CLUSTER -o "
                           "plan.json`") from None


class _Progress:
    """A spinner with the elapsed time and the current phase, shown while planning runs on a
    terminal and gone when it ends; nothing at all where ``enabled`` is False."""

    def __init__(self, enabled: bool):
        self._progress = self._task = None
        self._phase = ""
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn)
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                      BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                      transient=True)

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def phase(self, text: str) -> None:
        if self._progress is None:
            return
        self._phase = text
        if self._task is None:
            self._task = self._progress.add_task(text, total=None)
        else:
            self._progress.update(self._task, description=text, total=None, completed=0)

    @contextlib.contextmanager
    def planner(self):
        """The planner reports to this display while inside, not with a bar of its own."""
        from .search.meshes import PROGRESS
        token = PROGRESS.set(self._planned if self._progress is not None else None)
        try:
            yield
        finally:
            PROGRESS.reset(token)

    def _planned(self, label: str, done: int, total: int) -> None:
        """``done`` of the ``total`` programs (one per candidate mesh) planned, the last on
        ``label``."""
        self._progress.update(self._task, total=total, completed=done,
                              description=f"{self._phase}: {label}")

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()


# -- values of options -------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _mesh(text: str) -> dict:
    """``"dp=2,tp=4"`` -> ``{"dp": 2, "tp": 4}``."""
    out = {}
    for part in text.split(","):
        axis, eq, size = part.partition("=")
        if not eq or not axis.strip() or not size.strip().isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: write AXIS=SIZE,... with whole "
                                             "sizes, e.g. dp=2,tp=4")
        out[axis.strip()] = int(size)
    return out


def _bytes(text: str) -> int:
    """``"16GiB"`` -> ``17179869184``; units of BYTE_UNITS, any case; no unit: bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?(?:e\d+)?)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in BYTE_UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: write a positive size such as 16GiB, "
                                         "40GB or 512MiB")
    return int(float(m.group(1)) * BYTE_UNITS[m.group(2).lower()])


def _stages(text: str) -> tuple:
    parts = text.split(",")
    if not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: write the layers of each stage, e.g. 3,5")
    return tuple(int(p) for p in parts)


def _layouts(items, flag: str) -> dict:
    """``["h.*.weight=RS(0)"]`` -> ``{"h.*.weight": (Replicate(), Shard(0))}``."""
    out = {}
    for item in items:
        glob, eq, layout = item.rpartition("=")
        if not eq or not glob or not layout:
            raise UsageError(f"{flag} {item!r}: write GLOB=LAYOUT, e.g. {flag} "
                             "'h.*.mlp.c_fc.weight=RS(0)'")
        try:
            out[glob] = parse_layout(layout.strip())
        except PlanError as e:
            raise UsageError(f"{flag} {item!r}: {e}") from None
    return out


def _recompute(items):
    """``--recompute`` values as ``autopar.plan``'s ``recompute``: None, or globs over block
    paths to choices (a bare CHOICE is every block's)."""
    out = {}
    for item in items:
        glob, _, choice = item.rpartition("=")
        if choice not in RECOMPUTE_CHOICES:
            raise UsageError(f"--recompute {item!r}: the choice is one of "
                             f"{', '.join(RECOMPUTE_CHOICES)}, e.g. --recompute "
                             "'layers.*=full'")
        out[glob or "*"] = choice
    return out or None
