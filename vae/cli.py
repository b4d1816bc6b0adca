"""What the command lines share: flags generated from dataclass fields, and one-line errors.

A dataclass field that carries a ``help`` text in its metadata becomes one flag
(:func:`add_dataclass_arguments`) and one keyword parameter (:func:`dataclass_parameters`, which
:func:`expand_kwargs` writes into a function's signature, where Prefect reads a flow's
parameters), so a list of options is written once (the config sections of :mod:`vae.config`,
the sweep options of ``tuning``) and neither the flags nor the parameters can drift from it.
:func:`run_cli` runs a command's body and turns a :class:`~vae.errors.UserError` into one line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import types
import typing
from typing import Any, Callable, Literal

from vae.errors import Interrupted, UserError

__all__ = ["add_dataclass_arguments", "dataclass_parameters", "expand_kwargs", "given_arguments", "parse_bool",
           "run_cli"]


def run_cli(main: Callable[[Any], int | None], argv=None, extra_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a CLI body, turning user-facing errors into one line and exit code 2, and work stopped on
    request (:class:`~vae.errors.Interrupted`) into one line and exit code 130.

    Args:
        main: the CLI body, ``main(argv) -> exit code``.
        argv: its arguments (None: ``sys.argv[1:]``).
        extra_errors: further exception types to report the same way (errors of other libraries).
    """
    try:
        return main(argv) or 0
    except (UserError, *extra_errors) as e:
        print(f"error: {e.message() if isinstance(e, UserError) else e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 130


def parse_bool(text: str) -> bool:
    """``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case)."""
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _lenient(convert):
    """An argparse type that keeps text it cannot convert, so that the validation after parsing
    names every bad flag at once (argparse itself would stop at the first)."""
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except (ValueError, argparse.ArgumentTypeError):
            return text
    parse.__name__ = convert.__name__
    return parse


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _flag_kwargs(hint: Any, lenient: bool) -> dict[str, Any]:
    """argparse keyword arguments for a field of type ``hint``."""
    hint = _strip_optional(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    wrap = _lenient if lenient else (lambda convert: convert)
    if origin is Literal:
        if lenient:  # checked after parsing, with every other bad flag
            return {"metavar": "{" + ",".join(map(str, args)) + "}"}
        return {"choices": args}
    if origin is tuple:
        item = args[0] if args else str
        nargs = "+" if len(args) == 2 and args[1] is Ellipsis else len(args)
        return {"type": wrap(item), "nargs": nargs, "metavar": "N" if item is int else "X"}
    if hint is bool:
        return {"type": _lenient(parse_bool), "metavar": "BOOL"} if lenient else {"action": "store_true"}
    return {"type": wrap(hint)}


def add_dataclass_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                            dashes: bool = False, lenient: bool = False) -> None:
    """Add one flag per field of dataclass ``cls`` that has ``metadata["help"]``.

    Every flag defaults to None (not given), so the caller can tell a flag given from a default
    (see :func:`given_arguments`); the help text shows the field's default. A field's
    ``metadata["cli"]`` (a dict) overrides the generated argparse keywords, e.g. other flag
    names under ``"flags"`` or ``action="append"``.

    Args:
        dashes: ``--study-name`` instead of ``--study_name``.
        lenient: keep values that do not convert (and take booleans as ``--flag BOOL``) so that
            validation after parsing can name every bad flag; otherwise argparse rejects them
            and booleans are switches (``--flag``).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        kwargs = {**_flag_kwargs(hints[f.name], lenient), "default": None,
                  "help": f"{f.metadata['help']} (default: {shown})"}
        extra = dict(f.metadata.get("cli", {}))
        flags = extra.pop("flags", None) or ("--" + (f.name.replace("_", "-") if dashes else f.name),)
        if extra.get("action") in ("append", "store_const", "store_true", "store_false"):
            for key in ("type", "nargs", "metavar", "choices"):
                if key not in extra:
                    kwargs.pop(key, None)
        kwargs.update(extra)
        if default is None or kwargs.get("action") in ("store_true", "store_false"):
            kwargs["help"] = extra.get("help", f.metadata["help"])  # no default to show: the help says it
        parser.add_argument(*flags, dest=f.name, **kwargs)


def given_arguments(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` whose flags were given (not None) in ``args``."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}


def dataclass_parameters(cls: type, *, optional: bool = False) -> list[inspect.Parameter]:
    """One keyword-only parameter per field of dataclass ``cls`` that has ``metadata["help"]``,
    with the field's type and default: the fields :func:`add_dataclass_arguments` makes flags of.

    Args:
        optional: every parameter ``T | None = None`` (None: not given), for keys that override
            a base, such as the config keys of a flow over a preset.
    """
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        if optional:
            annotation, default = typing.Optional[hints[f.name]], None
        else:
            annotation = hints[f.name]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return out


def expand_kwargs(*parameters: inspect.Parameter) -> Callable[[Callable], Callable]:
    """A decorator: write ``parameters`` into the function's signature in place of its ``**kwargs``.

    The function still receives them in ``**kwargs``; whatever reads its signature (Prefect's flow
    parameters and their schema, ``help()``, argument binding) sees each one by name, type and
    default. Apply it below ``@flow``.
    """
    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        if len(own) == len(sig.parameters):
            raise TypeError(f"{fn.__name__} has no **kwargs for the generated parameters")
        fn.__signature__ = sig.replace(parameters=[*own, *parameters])  # a duplicate name raises ValueError
        return fn
    return decorate
