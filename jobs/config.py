"""One command line for every typed job config: ``--config FILE``, ``--<key>`` flags and
``key=value`` overrides.

The models and their loading live in :mod:`cvnet.config` (pipelines receive the typed objects);
this module turns a model into argparse arguments and a parsed namespace back into the model.
Flags exist for the model's top-level scalar keys (a bool is ``--x`` / ``--no-x``, a tuple takes
several values); every key, sections included (``section.key``), can be set in the file or as a
trailing ``key=value``. Precedence: defaults < file < flags < overrides.
"""
from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel

from cvnet.config import (ConfigError, ExtractConfig, M, TrainGlobalConfig, describe_keys,
                          load_config, parse_overrides)

__all__ = ["ConfigError", "ExtractConfig", "TrainGlobalConfig",
           "add_config_arguments", "config_from_args", "load_config", "parse_overrides"]


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


class _ValuesFlag(argparse.Action):
    """A flag taking several values; ``key=value`` words after them are overrides, not values
    (``--scales 1.0 0.7 shard_size=4``)."""

    def __init__(self, *args, item: type = str, **kwargs):
        super().__init__(*args, **kwargs)
        self.item = item

    def __call__(self, parser, namespace, values, option_string=None):
        cut = next((i for i, word in enumerate(values) if "=" in word), len(values))
        if cut == 0:
            parser.error(f"argument {option_string}: expected at least one value")
        try:
            setattr(namespace, self.dest, [self.item(word) for word in values[:cut]])
        except ValueError:
            parser.error(f"argument {option_string}: expected {self.item.__name__} values, got {values[:cut]}")
        namespace.trailing_overrides = [*getattr(namespace, "trailing_overrides", []), *values[cut:]]


def flag_options(annotation: Any) -> dict[str, Any] | None:
    """argparse options for a field of this type; ``None`` for a section (overrides only)."""
    kind = _without_none(annotation)
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return None
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        return {"nargs": "+", "action": _ValuesFlag, "item": args[0], "metavar": args[0].__name__.upper()}
    if origin is Literal:
        return {"type": type(args[0]), "choices": args}
    return {"type": kind if kind in (int, float, str) else str}  # pydantic validates the rest


def add_config_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """Add ``--config``, the flags of ``model``'s top-level scalar keys and ``key=value ...``;
    the help lists every key with its description (section keys in the epilog)."""
    parser.add_argument("--config", metavar="FILE", default=None, help="YAML config file (see configs/)")
    flags = parser.add_argument_group("config keys (also settable in the file or as key=value)")
    sections = []
    for name, field in model.model_fields.items():
        options = flag_options(field.annotation)
        if options is None:
            sections.append(name)
            continue
        default = ("required" if field.is_required() else
                   "" if field.default is None else f"default: {field.default!r}")
        text = f"{field.description} ({default})" if default else field.description
        flags.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
                           help=text.replace("%", "%%"), **options)
    parser.add_argument("overrides", nargs="*", metavar="key=value", default=[],
                        help="overrides after the flags: YAML values, dotted keys for sections")
    keys = [row for row in describe_keys(model) if row[0].split(".", 1)[0] in sections]
    if keys:
        width = max(len(key) for key, _, _ in keys)
        parser.epilog = "section keys (file or key=value):\n" + "\n".join(
            f"  {key:<{width}}  {description} (default: {default})" for key, default, description in keys)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


def config_from_args(model: type[M], args: argparse.Namespace) -> M:
    """The validated config: defaults < ``args.config`` < flags given < ``args.overrides``."""
    values = {name: getattr(args, name) for name in model.model_fields
              if flag_options(model.model_fields[name].annotation) is not None and hasattr(args, name)}
    overrides = [*args.overrides, *getattr(args, "trailing_overrides", [])]
    return load_config(model, args.config, overrides, values)
