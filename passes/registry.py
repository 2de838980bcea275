"""The pass registry: onnxforge's passes register on import, third-party ones by entry point.

A third-party package exposes its passes in its ``pyproject.toml``::

    [project.entry-points."onnxforge.passes"]
    my-pass = "my_package.my_module:MyPass"

The entry point may name a pass class (registered under its ``name``) or a module whose import
registers its passes with :func:`register`.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import logging
from typing import TypeVar

from onnxforge.errors import InputError
from onnxforge.passes.base import PassBase

__all__ = ["ENTRY_POINT_GROUP", "register", "unregister", "get_pass", "available_passes"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onnxforge.passes"

_REGISTRY: dict[str, type[PassBase]] = {}
_entry_points_loaded = False

PassT = TypeVar("PassT", bound=type[PassBase])


def register(cls: PassT) -> PassT:
    """Class decorator: make a pass available to pipelines under its ``name``."""
    if not (inspect.isclass(cls) and issubclass(cls, PassBase)):
        raise TypeError(f"@register takes a Pass subclass, got {cls!r}")
    for attr in ("name", "summary", "semantics"):
        if not getattr(cls, attr, None):
            raise TypeError(f"{cls.__name__} must set the class attribute '{attr}'")
    cls.options()  # fail at registration, not at first use, when an option lacks a default
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise TypeError(
            f"pass name '{cls.name}' is taken by {existing.__module__}.{existing.__qualname__}"
        )
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> type[PassBase] | None:
    """Remove the pass registered under ``name`` (for tests and plug-in reloading)."""
    return _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
        except Exception as error:  # a broken plug-in must not take the tool down
            logger.warning("could not load pass plug-in %r: %s", entry_point.value, error)
            continue
        if inspect.isclass(loaded) and issubclass(loaded, PassBase):
            register(loaded)


def available_passes() -> dict[str, type[PassBase]]:
    """All registered passes, built-in and plug-in, sorted by name."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[PassBase]:
    """The pass class registered under ``name``; an unknown name lists what exists."""
    passes = available_passes()
    try:
        return passes[name]
    except KeyError:
        close = difflib.get_close_matches(name, passes, n=1)
        guess = f"did you mean '{close[0]}'? " if close else ""
        raise InputError(
            f"unknown pass '{name}'",
            hint=f"{guess}available passes: {', '.join(passes)} (see `onnxforge passes`)",
        ) from None
