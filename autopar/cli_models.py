"""What ``autopar plan`` plans: the model named on the command line, its example inputs and
the cluster.

A model is named as ``path/to/file.py:Name``, ``package.module:Name`` or ``hf:NAME``
(:func:`load_model`); it is built on the meta device, so that no memory holds its weights.
Its example inputs come from ``--inputs`` (or a function ``example_inputs`` beside the
model), else are made for a token model (:func:`example_inputs`). The cluster is a preset, a
cluster file or ``local:N`` (:func:`load_cluster`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
import typing

import torch
from torch import nn

from .cost.cluster import Cluster
from .cost.hardware import PRESETS
from .errors import closest


class CommandError(ValueError):
    """A value given on the command line that cannot be used: its message names the value
    and a remedy. Exit status 1."""

    status = 1


class UsageError(CommandError):
    """A command line that cannot be read (a malformed ``KEY=VALUE``, size or layout).
    Exit status 2, as argparse's own errors."""

    status = 2


# Names a forward's parameter for the labels of a loss takes: it gets the token ids too.
LABEL_NAMES = ("labels", "targets")
# Config fields stating the longest sequence a model takes: the default --seq is cut to it.
SEQUENCE_LIMITS = ("max_position_embeddings", "n_positions", "block_size", "max_seq_len",
                   "seq_len", "context_length")
# The head a transformers model gets where its config names no architecture: the first of
# these tables (transformers.models.auto.modeling_auto) that knows its model type. Encoders
# that both masked and causal LM heads exist for (BERT) take their pretraining head.
HF_HEADS = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
            "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
            "MODEL_MAPPING_NAMES")


@dataclasses.dataclass
class Target:
    """A model named on the command line, not built yet: ``build(device)`` makes it there
    (an nn.Module), ``module`` is the Python module it came from (None for ``hf:``)."""

    spec: str
    build: typing.Callable
    module: object = None


def parse_value(text: str):
    """A ``--arg`` value: a Python literal (``4``, ``0.1``, ``True``, ``(3, 5)``), else the
    text itself as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_assignments(items, flag: str, example: str) -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``; a UsageError naming ``flag`` for an item
    without ``=`` or with a key that is not a Python name."""
    out = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise UsageError(f"{flag} {item!r}: write KEY=VALUE with KEY a Python name, "
                             f"e.g. {flag} {example}")
        out[key] = parse_value(value)
    return out


# -- models --------------------------------------------------------------------------------

def load_model(spec: str, args: dict) -> Target:
    """The model ``spec`` names, built with ``args``: ``FILE.py:NAME`` (the file's folder
    goes first on sys.path, so that its own imports work), ``package.module:NAME`` or
    ``hf:NAME`` (a transformers model type such as ``llama``, a config or model class name
    such as ``LlamaConfig`` or ``LlamaForCausalLM``, or a config.json; random weights,
    nothing downloaded). NAME may be a dotted path inside the module."""
    if spec.startswith("hf:"):
        return Target(spec, lambda device: _build_hf(spec[3:], args, device))
    where, colon, name = spec.rpartition(":")
    if not colon or not where or not name:
        raise UsageError(f"model {spec!r}: write FILE.py:NAME, package.module:NAME or hf:NAME, "
                         "e.g. examples/models.py:GPT or hf:llama")
    module = _import(where, spec)
    obj = module
    for i, part in enumerate(name.split(".")):
        if not hasattr(obj, part):
            found = ".".join(name.split(".")[:i]) or where
            raise CommandError(f"{found} has no {part!r} (from {spec!r}); it defines: "
                               f"{', '.join(_candidates(obj)) or 'no models'} "
                               f"(closest: {closest(part, _candidates(obj))})")
        obj = getattr(obj, part)
    return Target(spec, lambda device: _built(obj, args, spec, device), module)


def _import(where: str, spec: str):
    if where.endswith(".py") or os.sep in where or os.path.exists(where):
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise CommandError(f"model file {where!r} not found (from {spec!r}); give the path "
                               "of a .py file, relative to this folder or absolute")
        name = os.path.splitext(os.path.basename(path))[0]
        loaded = sys.modules.get(name)
        if getattr(loaded, "__file__", None) == path:   # --inputs naming the model's file
            return loaded
        sys.path.insert(0, os.path.dirname(path))
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module   # dataclasses and pickling look their module up here
        _run_user_code(lambda: module_spec.loader.exec_module(module), f"running {where}")
        return module
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        if e.name is not None and where.startswith(e.name):
            raise CommandError(f"no module or file {where!r} (from {spec!r}): give the path "
                               "of a .py file (FILE.py:NAME) or an importable module "
                               "(package.module:NAME)") from None
        raise CommandError(f"importing {where} failed: ModuleNotFoundError: {e}") from e
    except Exception as e:  # the user's code: its error is the message
        raise CommandError(f"importing {where} failed: {type(e).__name__}: {e}") from e


def _run_user_code(fn, what: str):
    try:
        return fn()
    except CommandError:
        raise
    except Exception as e:  # the user's code: its error is the message
        raise CommandError(f"{what} failed: {type(e).__name__}: {e}") from e


def _candidates(obj) -> list:
    """What a module defines that ``autopar plan`` can build: nn.Module subclasses and
    instances, and functions."""
    home = getattr(obj, "__name__", None)
    out = []
    for name, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
        if name.startswith("_"):
            continue
        if isinstance(value, nn.Module) or (
                getattr(value, "__module__", None) == home and
                ((inspect.isclass(value) and issubclass(value, nn.Module)) or
                 inspect.isfunction(value))):
            out.append(name)
    return out


def _built(obj, args: dict, spec: str, device: str) -> nn.Module:
    """``obj`` (what ``spec`` names) as a model on ``device``: an nn.Module as it is, a
    module class constructed with ``args`` (as its own arguments, or as the fields of the
    one config object its constructor takes), a function called with ``args`` to return
    one."""
    if isinstance(obj, nn.Module):
        if args:
            raise CommandError(f"{spec} is an nn.Module already built; --arg applies to "
                               "classes and functions")
        return obj
    with torch.device(device):
        if inspect.isclass(obj) and issubclass(obj, nn.Module):
            return _construct(obj, args)
        if inspect.isclass(obj) or not callable(obj):
            raise CommandError(f"{spec} is {_kind(obj)}, not a model: name an nn.Module "
                               "subclass, an nn.Module, or a function returning one")
        name = getattr(obj, "__name__", spec)
        _check_keywords(obj, args, f"{name}()")
        model = _run_user_code(lambda: obj(**args), f"{name}({_call_text(args)})")
    if not isinstance(model, nn.Module):
        raise CommandError(f"{spec}: {name}() returned {_kind(model)}, not an nn.Module; name "
                           "a module class, or a function returning a module")
    return model


def _construct(cls, args: dict) -> nn.Module:
    params = _parameters(cls.__init__)[1:]   # after self
    own = {p.name for p in params if p.kind is not p.VAR_KEYWORD}
    config_cls = _config_class(cls, params)
    if config_cls is None or set(args) <= own:
        _check_keywords(cls, args, cls.__name__)
        return _run_user_code(lambda: cls(**args), f"{cls.__name__}({_call_text(args)})")
    _check_keywords(config_cls, args, config_cls.__name__)
    config = _run_user_code(lambda: config_cls(**args),
                            f"{config_cls.__name__}({_call_text(args)})")
    return _run_user_code(lambda: cls(config),
                          f"{cls.__name__}({config_cls.__name__}({_call_text(args)}))")


def _config_class(cls, params) -> type | None:
    """The class of the one config object ``cls`` is constructed from (its annotation, or
    the type of its default), None where the constructor takes other arguments."""
    if len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_OR_KEYWORD,
                                                  params[0].POSITIONAL_ONLY):
        return None
    p = params[0]
    try:
        hint = typing.get_type_hints(cls.__init__).get(p.name)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: use the default
        hint = None
    if not inspect.isclass(hint) and p.default is not p.empty and p.default is not None:
        hint = type(p.default)
    if not inspect.isclass(hint) or hint.__module__ == "builtins" or issubclass(hint, nn.Module):
        return None
    return hint


def _parameters(fn) -> list:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []


def _check_keywords(fn, args: dict, where: str) -> None:
    """A CommandError naming an argument in ``args`` that ``fn`` does not take, or one it
    needs that ``args`` does not give."""
    params = [p for p in _parameters(fn) if p.name != "self"]
    if not params:
        return
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        for key in args:
            if key not in names:
                raise CommandError(f"--arg {key}=...: {where} takes no argument {key!r}; it "
                                   f"takes {', '.join(names) or 'none'} (closest: "
                                   f"{closest(key, names)})")
    missing = [p.name for p in params if p.default is p.empty and p.name not in args and
               p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        how = "a class is constructed with the --arg values" if inspect.isclass(fn) else \
            "a function is called with the --arg values and returns the model"
        raise CommandError(f"{where} needs {', '.join(missing)}: give "
                           f"{'each' if len(missing) > 1 else 'it'} with --arg "
                           f"{missing[0]}=VALUE ({how})")


def _call_text(args: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def _kind(value) -> str:
    if inspect.isclass(value):
        return f"the class {value.__name__}"
    if inspect.ismodule(value):
        return f"the module {value.__name__}"
    return f"a {type(value).__name__}"


# -- transformers models ---------------------------------------------------------------------

def _build_hf(name: str, args: dict, device: str) -> nn.Module:
    transformers = _transformers(name)
    config, model_cls = _hf_config(transformers, name, args)
    if model_cls is None:
        model_cls = _hf_model_class(transformers, config)
    with torch.device(device):
        return _run_user_code(lambda: model_cls(config),
                              f"building {model_cls.__name__} of hf:{name}")


def _transformers(name: str):
    try:
        import transformers
    except ImportError as e:
        raise CommandError(f"hf:{name} needs transformers, which does not import here "
                           f"({e}): pip install transformers") from e
    return transformers


def _hf_config(transformers, name: str, args: dict):
    """The config ``hf:NAME`` names with ``args`` over its fields, and the model class NAME
    fixes (None where the config's head is chosen)."""
    if name.endswith(".json") or os.path.isdir(name):
        if not os.path.exists(name):
            raise CommandError(f"transformers config {name!r} not found (from hf:{name}); give "
                               "a config.json or a folder holding one")
        base = _hf_call(lambda: transformers.AutoConfig.from_pretrained(name,
                                                                        local_files_only=True),
                        f"reading {name}")
        _check_config_keys(base, args, name)
        for key, value in args.items():
            setattr(base, key, value)
        model_cls = None
        if getattr(base, "architectures", None):
            model_cls = getattr(transformers, base.architectures[0], None)
        return base, model_cls
    found = getattr(transformers, name, None) if name.isidentifier() else None
    if inspect.isclass(found) and issubclass(found, transformers.PreTrainedModel):
        config_cls, model_cls = found.config_class, found
    elif inspect.isclass(found) and issubclass(found, transformers.PretrainedConfig):
        config_cls, model_cls = found, None
    else:
        config_cls, model_cls = _hf_config_class(transformers, name), None
    _check_config_keys(_hf_call(config_cls, f"building {config_cls.__name__}"), args,
                       config_cls.__name__)
    return _hf_call(lambda: config_cls(**args),
                    f"{config_cls.__name__}({_call_text(args)})"), model_cls


def _hf_config_class(transformers, name: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    if name not in CONFIG_MAPPING_NAMES:
        where = (" autopar downloads nothing: save the model's config.json and pass "
                 "hf:path/to/config.json." if "/" in name else "")
        raise CommandError(f"hf:{name} is not a transformers model type, config or model "
                           f"class (closest: {closest(name, CONFIG_MAPPING_NAMES)}); e.g. "
                           f"hf:llama, hf:LlamaConfig, hf:LlamaForCausalLM.{where}")
    return _hf_call(lambda: getattr(transformers, CONFIG_MAPPING_NAMES[name]),
                    f"importing transformers' {CONFIG_MAPPING_NAMES[name]}")


def _hf_call(fn, what: str):
    """``fn()``, an error inside transformers (a submodule that does not import) as a
    CommandError naming the first cause."""
    try:
        return fn()
    except CommandError:
        raise
    except Exception as e:  # transformers' own error is the message
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        cause = f" (caused by {type(root).__name__}: {root})" if root is not e else ""
        raise CommandError(f"{what} failed: {type(e).__name__}: {e}{cause}") from e


def _check_config_keys(config, args: dict, where: str) -> None:
    """A transformers config takes fields it does not declare (a model may read one, as T5
    reads ``decoder_start_token_id``): each is set as given, with a note naming the
    closest declared ones in case it is a typo."""
    fields = sorted(k for k in vars(config) if not k.startswith("_"))
    for key in args:
        if not hasattr(config, key):
            sys.stderr.write(f"autopar: note: {where} declares no field {key!r} (closest: "
                             f"{closest(key, fields)}); set as given\n")


def _hf_model_class(transformers, config):
    from transformers.models.auto import modeling_auto
    for table in HF_HEADS:
        class_name = getattr(modeling_auto, table, {}).get(config.model_type)
        if isinstance(class_name, str) and hasattr(transformers, class_name):
            return getattr(transformers, class_name)
    raise CommandError(f"transformers has no model class for model type "
                       f"{config.model_type!r}; name one, e.g. hf:LlamaForCausalLM")


# -- example inputs --------------------------------------------------------------------------

def load_inputs_function(spec: str):
    """The function ``--inputs FILE.py:NAME`` (or ``package.module:NAME``) names."""
    where, colon, name = spec.rpartition(":")
    if not colon or not where or not name:
        raise UsageError(f"--inputs {spec!r}: write FILE.py:FUNCTION or "
                         "package.module:FUNCTION")
    module = _import(where, spec)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise CommandError(f"--inputs {spec!r}: {where} has no function {name!r} "
                           f"(closest: {closest(name, _candidates(module))})")
    return fn


def example_inputs(model: nn.Module, batch: int, seq: int | None, make=None):
    """The example inputs of ``model``, a tuple (positional) or a dict (keyword).

    ``make`` (from ``--inputs``, or the model's file's ``example_inputs``) is called as
    ``make(model, batch, seq)``. Otherwise: a transformers model reading ``input_ids``, or
    any model with an nn.Embedding (the first one's vocabulary), gets int64 token ids of
    shape (batch, seq), and the same ids as the labels where its forward takes ``labels`` or
    ``targets``; a transformers model reading ``pixel_values`` gets random images of the
    config's size and labels below its ``num_labels``. The inputs are on the model's device.
    """
    device = _device_of(model)
    if seq is None:
        seq = default_seq(model)
    else:
        _check_seq(model, seq)
    with torch.device(device):
        if make is not None:
            inputs = _run_user_code(lambda: make(model, batch, seq),
                                    f"{getattr(make, '__name__', 'inputs')}(model, {batch}, "
                                    f"{seq})")
            if isinstance(inputs, torch.Tensor):
                inputs = (inputs,)
            if not isinstance(inputs, (tuple, list, dict)):
                raise CommandError(f"{make.__name__}(model, batch, seq) returned "
                                   f"{_kind(inputs)}: return a tuple of positional inputs or a "
                                   "dict of keyword inputs")
            return tuple(inputs) if isinstance(inputs, list) else inputs
        if _is_hf(model):
            return _hf_inputs(model, batch, seq)
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        if embedding is None:
            raise CommandError(f"cannot tell what {type(model).__name__} takes as input (it has "
                               "no nn.Embedding to make token ids for): pass --inputs "
                               "FILE.py:FUNCTION, a function (model, batch, seq) returning the "
                               "example inputs as a tuple or a dict")
        return _token_inputs(model, _tokens(embedding.num_embeddings, batch, seq))


def default_seq(model: nn.Module, longest: int = 128) -> int:
    """``longest``, cut to the longest sequence the model's config states (a field of
    SEQUENCE_LIMITS of its ``config`` or ``cfg`` attribute)."""
    limit = _seq_limit(model)
    return longest if limit is None else min(longest, limit[1])


def _check_seq(model: nn.Module, seq: int) -> None:
    """A --seq longer than the model's config allows is an error naming the field."""
    limit = _seq_limit(model)
    if limit is not None and seq > limit[1]:
        raise CommandError(f"--seq {seq} is longer than the {limit[1]} tokens the model's "
                           f"config allows ({limit[0]}={limit[1]}): pass --arg "
                           f"{limit[0]}={seq}, or a --seq of at most {limit[1]}")


def _seq_limit(model: nn.Module):
    """(field, value) of the longest sequence the model's config states, or None."""
    config = getattr(model, "config", None) or getattr(model, "cfg", None)
    for name in SEQUENCE_LIMITS:
        limit = getattr(config, name, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return name, limit
    return None


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _tokens(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), dtype=torch.int64)


def _token_inputs(model: nn.Module, ids: torch.Tensor):
    params = [p for p in _parameters(model.forward)
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    label = next((p.name for p in params[1:] if p.name in LABEL_NAMES), None)
    if label is None:
        return (ids,)
    if params[1].name == label:
        return (ids, ids)
    return {params[0].name: ids, label: ids}


def _is_hf(model) -> bool:
    return "transformers" in sys.modules and \
        isinstance(model, sys.modules["transformers"].PreTrainedModel)


def _hf_inputs(model, batch: int, seq: int) -> dict:
    config = model.config
    takes = {p.name for p in _parameters(model.forward)}
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        vocab = getattr(config, "vocab_size", None) or \
            model.get_input_embeddings().num_embeddings
        ids = _tokens(vocab, batch, seq)
        return {"input_ids": ids, **({"labels": ids} if "labels" in takes else {})}
    if main == "pixel_values":
        size = config.image_size
        images = torch.randn(batch, getattr(config, "num_channels", 3), size, size)
        labels = torch.randint(0, getattr(config, "num_labels", 2), (batch,))
        return {"pixel_values": images, **({"labels": labels} if "labels" in takes else {})}
    raise CommandError(f"{type(model).__name__} reads {main!r}, which autopar makes no example "
                       "of: pass --inputs FILE.py:FUNCTION, a function (model, batch, seq) "
                       "returning the example inputs as a dict")


# -- clusters ----------------------------------------------------------------------------------

def load_cluster(text: str, nodes: int | None = None,
                 devices_per_node: int | None = None) -> Cluster:
    """The cluster ``--cluster`` names: a preset (one of PRESETS, ``nodes`` of it, each
    using ``devices_per_node``), a YAML or JSON cluster file, or ``local:N`` (this machine as
    N processes, measured once and cached: :meth:`Cluster.local`)."""
    is_file = text.endswith((".yaml", ".yml", ".json")) or os.path.sep in text
    if (text.startswith("local:") or is_file) and \
            (nodes is not None or devices_per_node is not None):
        raise UsageError(f"--nodes and --devices-per-node apply to presets, not to "
                         f"--cluster {text}")
    if text.startswith("local:"):
        count = text[len("local:"):]
        if not count.isdigit() or int(count) < 1:
            raise UsageError(f"--cluster {text!r}: write local:N with N the number of "
                             "processes, e.g. local:4")
        return Cluster.local(int(count))
    if is_file or os.path.isfile(text):
        if not os.path.isfile(text):
            raise CommandError(f"cluster file {text!r} not found; give a YAML or JSON cluster "
                               f"file, a preset ({', '.join(sorted(PRESETS))}) or local:N")
        return Cluster.load(text)
    known = {k.lower(): k for k in PRESETS}
    if text.lower() not in known:
        raise CommandError(f"unknown cluster {text!r}: give a preset "
                           f"({', '.join(sorted(PRESETS))}; closest: "
                           f"{closest(text, PRESETS)}), a YAML or JSON cluster file, or "
                           "local:N for N processes on this machine")
    return Cluster.preset(known[text.lower()], nodes=1 if nodes is None else nodes,
                          devices_per_node=devices_per_node)
