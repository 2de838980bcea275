"""The pass contract: a pass is an onnx-ir pass with a name, a summary, semantics and options.

A pass subclasses :class:`Pass` (in place) or :class:`FunctionalPass` (returns a new model),
implements ``call(model) -> PassResult(model, modified)`` and computes ``modified`` honestly.
Options are keyword-only constructor arguments with named-constant defaults; the pipeline
parser reads them from the signature, so a pass needs no other declaration to be configurable::

    DEFAULT_LIMIT = 1024

    @register
    class MyPass(Pass):
        name = "my-pass"
        summary = "One line saying what it does."
        semantics = Semantics.EXACT

        def __init__(self, *, limit: int = DEFAULT_LIMIT) -> None:
            self.limit = limit

        def call(self, model: ir.Model) -> PassResult:
            ...
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import typing
from typing import Any, ClassVar, Literal, get_args, get_origin

import onnx_ir as ir
from onnx_ir.passes import PassResult

__all__ = [
    "Semantics",
    "OptionSpec",
    "PassBase",
    "Pass",
    "FunctionalPass",
    "PassResult",
    "CUDA_PROVIDER_OPTIONS_KEY",
]

# Model metadata a pass may leave for the backend: a JSON object of CUDA execution provider
# options its output runs best with (``fp16{target=cuda}`` on convolutions). The backend's
# Session applies them on CUDA; options the caller passes win. Passes never import the backend.
CUDA_PROVIDER_OPTIONS_KEY = "onnxforge.cuda_provider_options"


class Semantics(str, enum.Enum):
    """How far a pass may move the model's outputs; VerifyNumerics picks its tolerance from it."""

    EXACT = "exact"  # bit-for-bit or algebraically equal
    REASSOCIATING = "reassociating"  # float reordering (fusions, folded arithmetic)
    APPROXIMATE = "approximate"  # a different formula (tanh-GELU for erf-GELU)
    LOSSY = "lossy"  # information is dropped (pruning, int8, fp16)

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One keyword-only option of a pass: its name, type annotation and default."""

    name: str
    annotation: Any
    default: Any

    @property
    def type_text(self) -> str:
        """The type as shown by ``onnxforge passes``: ``int``, ``bool``, ``a|b``, ``list[str]``."""
        choices = literal_choices(self.annotation)
        if choices:
            return "|".join(str(c) for c in choices)
        origin = get_origin(self.annotation)
        if origin in (list, tuple):
            (item, *_) = get_args(self.annotation) or (str,)
            return f"list[{getattr(item, '__name__', item)}]"
        return getattr(self.annotation, "__name__", str(self.annotation))


def literal_choices(annotation: Any) -> tuple[Any, ...]:
    """The allowed values of a ``Literal[...]`` annotation, or ``()`` for any other type."""
    return get_args(annotation) if get_origin(annotation) is Literal else ()


class PassBase(ir.passes.PassBase):
    """What every onnxforge pass declares on top of onnx-ir's pass protocol."""

    name: ClassVar[str]
    summary: ClassVar[str]
    semantics: ClassVar[Semantics]

    @classmethod
    def options(cls) -> tuple[OptionSpec, ...]:
        """The keyword-only constructor options, in declaration order."""
        init = cls.__init__
        if init is object.__init__:
            return ()
        hints = typing.get_type_hints(init)
        specs = []
        for param in list(inspect.signature(init).parameters.values())[1:]:  # after self
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if param.kind is not param.KEYWORD_ONLY:
                if param.default is param.empty:
                    raise TypeError(
                        f"{cls.__name__}: '{param.name}' must be a keyword-only option with a "
                        "default (write `def __init__(self, *, name=DEFAULT)`)"
                    )
                continue
            if param.default is inspect.Parameter.empty:
                raise TypeError(f"{cls.__name__}: option '{param.name}' needs a default")
            specs.append(OptionSpec(param.name, hints.get(param.name, str), param.default))
        return tuple(specs)

    def option_values(self) -> dict[str, Any]:
        """The current value of each option, read from the attribute of the same name."""
        return {spec.name: getattr(self, spec.name) for spec in self.options()}

    def __repr__(self) -> str:
        from onnxforge.passes.pipeline import format_pass

        return f"<{type(self).__name__} {format_pass(self)}>"


class Pass(PassBase, ir.passes.InPlacePass):
    """A pass that rewrites the model in place and returns it."""


class FunctionalPass(PassBase, ir.passes.FunctionalPass):
    """A pass that returns a new model and leaves its input untouched."""
