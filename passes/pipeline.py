"""Textual pipelines, as in MLIR: ``fold-constants,fuse,prune{sparsity=0.5,granularity=channel}``.

Grammar::

    pipeline := pass ("," pass)*
    pass     := NAME ["{" option ("," option)* "}"]
    option   := KEY "=" VALUE | VALUE       (a bare VALUE extends the previous list option)

So ``fuse{rules=cnn,transformer,target=cpu}`` gives ``rules=["cnn", "transformer"]``.
:func:`format_pipeline` prints one canonical string: passes in order, options in declaration
order, only those that differ from their defaults, values in one spelling (``true``, ``0.5``).
Parsing a canonical string and printing it again gives the same string.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterable, Sequence
from typing import Any, Union, get_args, get_origin

from onnxforge.errors import InputError
from onnxforge.passes.base import OptionSpec, PassBase, literal_choices
from onnxforge.passes.registry import get_pass

__all__ = [
    "parse_pipeline",
    "format_pipeline",
    "format_pass",
    "canonical_pipeline",
    "format_value",
    "PipelineLike",
]

PipelineLike = str | Sequence[str | PassBase]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _split_top_level(text: str, *, what: str) -> list[str]:
    """Split on commas outside braces; reject unbalanced braces with the position."""
    parts, depth, start = [], 0, 0
    for pos, char in enumerate(text):
        if char == "{":
            depth += 1
            if depth > 1:
                raise InputError(f"nested '{{' at position {pos} in {what} {text!r}")
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise InputError(f"unmatched '}}' at position {pos} in {what} {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:pos])
            start = pos + 1
    if depth:
        raise InputError(f"missing '}}' in {what} {text!r}")
    parts.append(text[start:])
    return [part.strip() for part in parts]


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = get_origin(annotation)
    if origin in (Union, getattr(types, "UnionType", Union)):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _is_list(annotation: Any) -> bool:
    return get_origin(_unwrap_optional(annotation)[0]) in (list, tuple)


def _convert_scalar(raw: str, annotation: Any, *, where: str) -> Any:
    choices = literal_choices(annotation)
    if choices:
        for choice in choices:
            if str(choice) == raw:
                return choice
        raise InputError(f"{where}: '{raw}' is not one of {', '.join(str(c) for c in choices)}")
    if annotation is bool:
        lowered = raw.lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise InputError(f"{where}: '{raw}' is not a boolean", hint="write true or false")
    if annotation in (int, float):
        try:
            return annotation(raw)
        except ValueError:
            raise InputError(f"{where}: '{raw}' is not {annotation.__name__}") from None
    return raw


def convert_option(spec: OptionSpec, raw: list[str], *, pass_name: str) -> Any:
    """Turn the text of an option into a value of the option's annotated type."""
    where = f"option '{spec.name}' of pass '{pass_name}'"
    annotation, optional = _unwrap_optional(spec.annotation)
    if optional and raw == ["none"]:
        return None
    origin = get_origin(annotation)
    if origin in (list, tuple):
        (item, *_) = get_args(annotation) or (str,)
        values = [_convert_scalar(r, item, where=where) for r in raw if r]
        return tuple(values) if origin is tuple else values
    if len(raw) != 1:
        raise InputError(f"{where} takes one value, got {','.join(raw)!r}")
    return _convert_scalar(raw[0], annotation, where=where)


def format_value(value: Any) -> str:
    """An option value in its one canonical spelling."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _parse_pass(text: str) -> PassBase:
    if not text:
        raise InputError("empty pass name in pipeline", hint="remove the stray comma")
    name, brace, rest = text.partition("{")
    name = name.strip()
    cls = get_pass(name)
    specs = {spec.name: spec for spec in cls.options()}
    raw_options: dict[str, list[str]] = {}
    if brace:
        if not rest.endswith("}"):
            raise InputError(f"text after '}}' in pass {text!r}")
        last_key: str | None = None
        for item in _split_top_level(rest[:-1], what=f"options of '{name}'"):
            key, equals, value = item.partition("=")
            if not equals:
                if last_key is None or not _is_list(specs[last_key].annotation):
                    raise InputError(
                        f"option {item!r} of pass '{name}' has no '='",
                        hint=f"write {name}{{KEY=VALUE,...}}; options: "
                        f"{', '.join(specs) or 'none'}",
                    )
                raw_options[last_key].append(item)
                continue
            key = key.strip()
            if key not in specs:
                close = difflib.get_close_matches(key, specs, n=1)
                guess = f"did you mean '{close[0]}'? " if close else ""
                listed = ", ".join(specs) or "this pass takes no options"
                raise InputError(
                    f"unknown option '{key}' for pass '{name}'",
                    hint=f"{guess}options: {listed}",
                )
            if key in raw_options:
                raise InputError(f"option '{key}' of pass '{name}' is given twice")
            raw_options[key] = [value.strip()]
            last_key = key
    kwargs = {
        key: convert_option(specs[key], raw, pass_name=name) for key, raw in raw_options.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise InputError(f"pass '{name}': {error}") from None


def parse_pipeline(pipeline: PipelineLike) -> list[PassBase]:
    """Pass instances from pipeline text, or from a sequence of texts and pass instances."""
    if isinstance(pipeline, str):
        if not pipeline.strip():
            raise InputError("the pipeline is empty", hint="see `onnxforge passes` for passes")
        return [_parse_pass(part) for part in _split_top_level(pipeline, what="pipeline")]
    passes: list[PassBase] = []
    for item in pipeline:
        if isinstance(item, PassBase):
            passes.append(item)
        elif isinstance(item, str):
            passes.extend(parse_pipeline(item))
        else:
            raise InputError(f"a pipeline holds pass texts or Pass instances, not {item!r}")
    return passes


def format_pass(pass_: PassBase) -> str:
    """One pass as canonical text: its name and the options that differ from their defaults."""
    options = [
        f"{spec.name}={format_value(value)}"
        for spec, value in zip(pass_.options(), pass_.option_values().values(), strict=True)
        if format_value(value) != format_value(spec.default)
    ]
    return f"{pass_.name}{{{','.join(options)}}}" if options else pass_.name


def format_pipeline(passes: Iterable[PassBase]) -> str:
    """The canonical text of a sequence of passes."""
    return ",".join(format_pass(p) for p in passes)


def canonical_pipeline(pipeline: PipelineLike) -> str:
    """Parse and print: the one spelling under which orderings are logged and compared."""
    return format_pipeline(parse_pipeline(pipeline))
