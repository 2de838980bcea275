"""The exception hierarchy: one base class, each error carrying a hint and its exit code."""

from __future__ import annotations

__all__ = [
    "first_line",
    "one_line",
    "OnnxforgeError",
    "InputError",
    "PassError",
    "VerificationError",
    "EXIT_OK",
    "EXIT_VERIFICATION_FAILED",
    "EXIT_BAD_INPUT",
]

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_BAD_INPUT = 2


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def one_line(text: str) -> str:
    """``text`` as one line: line breaks become spaces, other control characters are escaped.

    Messages quote names from untrusted models, which may hold any character.
    """
    joined = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in joined)


class OnnxforgeError(Exception):
    """Base class of every error onnxforge raises on purpose.

    The message and hint are one line each (see :func:`one_line`); the CLI prints
    ``error: <message> (hint: <hint>)`` and exits with ``exit_code``.
    """

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(one_line(message))
        self.hint = one_line(hint) if hint else hint


class InputError(OnnxforgeError):
    """Bad input or usage: a missing file, an unknown pass, an invalid option value."""

    exit_code = EXIT_BAD_INPUT


class PassError(OnnxforgeError):
    """A pass failed; names the pass, its index in the pipeline and the passes before it."""

    exit_code = EXIT_VERIFICATION_FAILED

    def __init__(
        self,
        message: str,
        *,
        pass_name: str,
        index: int,
        previous: tuple[str, ...] = (),
        hint: str | None = None,
    ) -> None:
        where = f"pass #{index} '{pass_name}'"
        after = f" (after {','.join(previous)})" if previous else " (first pass)"
        super().__init__(f"{where}{after}: {message}", hint=hint)
        self.pass_name = pass_name
        self.index = index
        self.previous = previous
        self.records: list = []  # the pipeline's PassRecords up to and including this pass


class VerificationError(PassError):
    """A pass produced a model that failed structural or numerical verification."""

    exit_code = EXIT_VERIFICATION_FAILED
