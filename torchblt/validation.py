"""One validation layer for what users write: config files (run configs, ``model.arch``, a model's
``config.json``) and the command line's common options.

Every check raises ``ValueError`` with one line that names the field (a dotted key, or the option), the
value and what is allowed: ``optim.lr: expected a number, got 'fast'``, ``argument --device: expected
cpu, cuda, cuda:N or mps, got 'tpu'``. The CLI prints it as ``blt COMMAND: error: ...`` with exit code 2.

* :func:`build_dataclass` builds a (nested) config dataclass from a mapping, checking keys and types from
  the type hints: integers (an integral float such as ``1e3`` is accepted), numbers (YAML reads ``1e-5``
  without a dot as a string: a string that is a number is accepted), booleans (``true`` / ``false`` only),
  strings, lists, ``X | None`` (``null``) and nested dataclasses. A field named ``global_`` is written
  ``global`` (a trailing underscore only avoids a Python keyword).
* :func:`check_device` / :func:`resolve_dtype` and the argparse types (:func:`positive_int`,
  :func:`device_option`, ...) for the command line.
* :func:`read_text` / :func:`load_yaml` read a file the user named, naming it when it is missing, not
  UTF-8 or not valid YAML (with the line and column).

This module imports nothing from the package (every layer may use it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

import torch

__all__ = [
    "DTYPES",
    "build_dataclass",
    "check_device",
    "coerce",
    "device_option",
    "dtype_option",
    "load_yaml",
    "non_negative_int",
    "number",
    "positive_float",
    "positive_int",
    "read_text",
    "resolve_dtype",
]


# --------------------------------------------------------------------------- config values


def _key(where: str, name: str) -> str:
    name = name[:-1] if name.endswith("_") else name
    return f"{where}.{name}" if where else name


def _describe(tp: Any) -> str:
    """What a type hint allows, in words."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return "a list" if item is Any else f"a list of {_describe(item).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


class _Defaults:
    """The default value of every field of a dataclass (without building one: required fields may exist)."""

    def __init__(self, cls: type) -> None:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                setattr(self, f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                setattr(self, f.name, f.default_factory())


def build_dataclass(cls: type, data: Any, where: str = "", *, base: Any = None, inherit_defaults: bool = True) -> Any:
    """Dataclass ``cls`` from the mapping ``data``; an unknown key or a value of the wrong type raises one line.

    Fields ``data`` does not give take their value from ``base`` (default: the field defaults). With
    ``inherit_defaults`` a nested section applies over the parent's default of that section (so
    ``data.patching: {mode: entropy}`` keeps ``data``'s own patching defaults); without it (architecture
    configs) a nested section starts from its class's defaults and must give its required fields.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping ({cls.__name__}), got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    written = {(n[:-1] if n.endswith("_") else n): n for n in fields}  # "global" -> global_
    unknown = sorted(k for k in data if k not in fields and k not in written)
    if unknown:
        raise ValueError(f"{_key(where, str(unknown[0]))}: unknown key; known keys here: {', '.join(sorted(written))}")
    defaults = base if base is not None else _Defaults(cls)
    kwargs = {n: getattr(defaults, n) for n in fields} if base is not None else {}
    for given, value in data.items():
        name = given if given in fields else written[given]
        nested_default = getattr(defaults, name, None) if inherit_defaults else None
        kwargs[name] = coerce(hints[name], value, _key(where, name), nested_default,
                              inherit_defaults=inherit_defaults)
    missing = [_key(where, n) for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{missing[0]}: missing (required)")
    return cls(**kwargs)


def coerce(tp: Any, value: Any, key: str, default: Any = None, *, inherit_defaults: bool = True) -> Any:
    """``value`` as the type hint ``tp`` says (see the module docstring), or ``ValueError`` naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(arg, value, key, default, inherit_defaults=inherit_defaults)
            except ValueError as e:
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    raise e from None  # the mapping was meant for this section: its own message is the clear one
        raise ValueError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return build_dataclass(tp, value, key, base=default if isinstance(default, tp) else None,
                               inherit_defaults=inherit_defaults)
    if origin is list:
        if isinstance(value, (str, int, float)) and typing.get_args(tp) and typing.get_args(tp)[0] is str:
            value = [value]  # a single source is a list of one
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected {_describe(tp)}, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 4e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected a string, got {value!r}")
    return value


# --------------------------------------------------------------------------- devices and dtypes

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def _at(where: str, message: str) -> str:
    return f"{where}: {message}" if where else message


def resolve_dtype(dtype: str | torch.dtype, where: str = "dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(_at(where, f"expected one of {', '.join(sorted(DTYPES))}, got {dtype!r}")) from None


def check_device(name: str | torch.device, where: str = "device", *, allow_auto: bool = False,
                 check_available: bool = True) -> str:
    """``name`` if it is a device this machine has (``auto`` too with ``allow_auto``), else ``ValueError``."""
    text = str(name)
    if allow_auto and text == "auto":
        return text
    expected = f"{'auto, ' if allow_auto else ''}cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(_at(where, f"expected {expected}, got {text!r}")) from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(_at(where, f"expected {expected}, got {text!r}"))
    if not check_available:
        return text
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(_at(where, f"{text!r} asked for but CUDA is not available ({why}); use cpu"))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(_at(where, f"{text!r} asked for but this machine has {torch.cuda.device_count()} "
                                        "CUDA device(s)"))
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(_at(where, "'mps' asked for but MPS is not available; use cpu"))
    return text


# --------------------------------------------------------------------------- argparse types (one line each)


def _arg_type(check: Any, name: str) -> Any:
    def parse(text: str) -> Any:
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name
    return parse


def _number(text: str, kind: type, lower: float, strict: bool, words: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"expected {words}, got {text!r}") from None
    if value < lower or (strict and value == lower) or value != value:  # NaN fails every comparison
        raise ValueError(f"expected {words}, got {text!r}")
    return value


positive_int = _arg_type(lambda t: _number(t, int, 0, True, "a positive integer"), "positive_int")
non_negative_int = _arg_type(lambda t: _number(t, int, 0, False, "an integer >= 0"), "non_negative_int")
positive_float = _arg_type(lambda t: _number(t, float, 0.0, True, "a positive number"), "positive_float")
number = _arg_type(lambda t: _number(t, float, float("-inf"), False, "a number"), "number")
device_option = _arg_type(lambda t: check_device(t, ""), "device")
dtype_option = _arg_type(lambda t: (resolve_dtype(t, ""), t)[1], "dtype")


# --------------------------------------------------------------------------- files


def read_text(path: str | os.PathLike[str], what: str = "") -> str:
    """The UTF-8 text of a file the user named; ``FileNotFoundError`` / ``ValueError`` name it (``what``: e.g.
    ``--input``)."""
    p = Path(path)
    label = f"{what} {p}" if what else str(p)
    if not p.is_file():
        raise FileNotFoundError(f"{label}: no such file" + (" (it is a folder)" if p.is_dir() else ""))
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{label}: not UTF-8 text (line {line}, byte {e.start}: {e.reason})") from None


def load_yaml(path: str | os.PathLike[str], what: str = "") -> Any:
    """The YAML document of a file the user named (``safe_load``: no tags that build objects); errors name the
    file, and for bad YAML the line and column."""
    import yaml

    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{f'{what} ' if what else ''}{Path(path)}: not valid YAML ({yaml_problem(e)})") from None


def yaml_problem(e: Exception) -> str:
    """A YAML error in a few words, with its line and column when known."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem
