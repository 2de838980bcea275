"""Textual pipelines: parse, print one canonical string, and reject bad text with a clear error."""

from __future__ import annotations

import math
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxforge.errors import InputError
from onnxforge.passes import (
    CleanupPass,
    Pass,
    PassResult,
    Semantics,
    canonical_pipeline,
    format_pass,
    format_pipeline,
    parse_pipeline,
    register,
)

DEFAULT_COUNT = 3
DEFAULT_RATIO = 0.5
DEFAULT_LABEL = "base"
DEFAULT_RULES = ("conv", "gemm")


@register
class OptionsPass(Pass):
    """One option of every supported type."""

    name = "test-options"
    summary = "Takes options of every type and does nothing with them."
    semantics = Semantics.EXACT

    def __init__(
        self,
        *,
        count: int = DEFAULT_COUNT,
        ratio: float = DEFAULT_RATIO,
        strict: bool = False,
        label: str = DEFAULT_LABEL,
        mode: Literal["fast", "exact"] = "fast",
        rules: list[str] = DEFAULT_RULES,
        limit: int | None = None,
        tag: str | None = None,
    ) -> None:
        self.count = count
        self.ratio = ratio
        self.strict = strict
        self.label = label
        self.mode = mode
        self.rules = rules
        self.limit = limit
        self.tag = tag

    def call(self, model):
        return PassResult(model, False)


@register
class FoldPass(Pass):
    """A list option followed by a Literal option, as in MLIR's ``fold{rules=a,b,target=cpu}``."""

    name = "test-fold"
    summary = "Takes a rule list and a target."
    semantics = Semantics.EXACT

    def __init__(
        self, *, rules: list[str] = DEFAULT_RULES, target: Literal["cpu", "cuda"] = "cpu"
    ) -> None:
        self.rules = rules
        self.target = target

    def call(self, model):
        return PassResult(model, False)


@register
class PlainPass(Pass):
    """No options at all."""

    name = "test-plain"
    summary = "Takes no options."
    semantics = Semantics.EXACT

    def call(self, model):
        return PassResult(model, False)


def values_equal(a, b) -> bool:
    """Option values compare equal, NaN included; lists and tuples compare by items."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------------------------------------
# Canonical round trip


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("test-plain", "test-plain"),
        ("  test-plain ,  cleanup ", "test-plain,cleanup"),
        # options come out in declaration order, whatever order they went in
        ("test-options{ratio=0.25,count=7}", "test-options{count=7,ratio=0.25}"),
        # one spelling per value: booleans, floats, Literal choices
        ("test-options{strict=yes}", "test-options{strict=true}"),
        ("test-options{strict=ON}", "test-options{strict=true}"),
        ("test-options{strict=1}", "test-options{strict=true}"),
        ("test-options{ratio=1}", "test-options{ratio=1.0}"),
        ("test-options{ratio=.125}", "test-options{ratio=0.125}"),
        ("test-options{ratio=1e-5}", "test-options{ratio=1e-05}"),
        ("test-options{mode=exact}", "test-options{mode=exact}"),
        # values equal to their defaults are dropped
        ("test-options{count=3,strict=false,mode=fast,label=base}", "test-options"),
        ("test-options{ratio=0.50}", "test-options"),
        ("test-options{rules=conv,gemm}", "test-options"),
        ("test-options{limit=none,tag=none}", "test-options"),
        ("cleanup{deduplicate=true}", "cleanup"),
        # optional values
        ("test-options{limit=12}", "test-options{limit=12}"),
        ("test-options{tag=v2}", "test-options{tag=v2}"),
        # lists: bare values continue the previous list option
        ("test-fold{rules=a,b,target=cuda}", "test-fold{rules=a,b,target=cuda}"),
        ("test-fold{target=cuda,rules=a,b,c}", "test-fold{rules=a,b,c,target=cuda}"),
        ("test-fold{rules=only}", "test-fold{rules=only}"),
        ("test-fold{rules=}", "test-fold{rules=}"),
        ("test-fold{rules=a,b,}", "test-fold{rules=a,b}"),
        # whitespace around names, keys and values is not part of them
        ("test-fold{ rules = a , b , target = cuda }", "test-fold{rules=a,b,target=cuda}"),
        (
            "cleanup,test-options{count=0},cleanup{deduplicate=false},test-plain",
            "cleanup,test-options{count=0},cleanup{deduplicate=false},test-plain",
        ),
    ],
)
def test_canonical_text(text: str, canonical: str) -> None:
    passes = parse_pipeline(text)
    assert format_pipeline(passes) == canonical
    assert canonical_pipeline(text) == canonical
    # the canonical text is a fixed point
    assert format_pipeline(parse_pipeline(canonical)) == canonical


def test_option_values_are_typed() -> None:
    (options,) = parse_pipeline(
        "test-options{count=-4,ratio=2.5,strict=false,label=x1,mode=exact,"
        "rules=a,b,c,limit=9,tag=none}"
    )
    assert isinstance(options, OptionsPass)
    assert options.option_values() == {
        "count": -4,
        "ratio": 2.5,
        "strict": False,
        "label": "x1",
        "mode": "exact",
        "rules": ["a", "b", "c"],
        "limit": 9,
        "tag": None,
    }
    assert type(options.count) is int
    assert type(options.ratio) is float
    assert type(options.strict) is bool


def test_list_continuation_feeds_the_right_option() -> None:
    (fold,) = parse_pipeline("test-fold{rules=a,b,target=cuda}")
    assert fold.rules == ["a", "b"]
    assert fold.target == "cuda"
    (fold,) = parse_pipeline("test-fold{rules=a,b}")
    assert fold.rules == ["a", "b"]
    assert fold.target == "cpu"


def test_empty_list_differs_from_default() -> None:
    (fold,) = parse_pipeline("test-fold{rules=}")
    assert fold.rules == []
    assert format_pass(fold) == "test-fold{rules=}"


def test_format_pass_of_instances_built_in_python() -> None:
    assert format_pass(OptionsPass()) == "test-options"
    assert format_pass(OptionsPass(strict=True, rules=["x"])) == "test-options{strict=true,rules=x}"
    assert format_pass(CleanupPass(deduplicate=False)) == "cleanup{deduplicate=false}"
    assert "test-options{count=5}" in repr(OptionsPass(count=5))


def test_sequences_mix_texts_and_instances() -> None:
    instance = FoldPass(target="cuda")
    passes = parse_pipeline(["cleanup,test-plain", instance, "test-options{count=1}"])
    assert [type(p) for p in passes] == [CleanupPass, PlainPass, FoldPass, OptionsPass]
    assert passes[2] is instance
    assert (
        canonical_pipeline(passes)
        == "cleanup,test-plain,test-fold{target=cuda},test-options{count=1}"
    )


def test_every_parse_gives_fresh_instances() -> None:
    first, second = parse_pipeline("test-plain,test-plain")
    assert first is not second


# ---------------------------------------------------------------------------------------------
# Errors: always InputError, always saying what is wrong and what would be right


def parse_error(text) -> InputError:
    with pytest.raises(InputError) as info:
        parse_pipeline(text)
    return info.value


def full_text(error: InputError) -> str:
    return f"{error} {error.hint or ''}"


def test_unknown_pass_lists_available_passes_and_a_guess() -> None:
    error = parse_error("cleanup,test-optoins{count=2}")
    assert "unknown pass 'test-optoins'" in str(error)
    assert "did you mean 'test-options'?" in error.hint
    for name in ("cleanup", "collapse-relu", "test-options", "test-fold", "test-plain"):
        assert name in error.hint


def test_unknown_pass_without_close_match_still_lists_passes() -> None:
    error = parse_error("zzzzzzzz")
    assert "unknown pass 'zzzzzzzz'" in str(error)
    assert "did you mean" not in error.hint
    assert "cleanup" in error.hint


def test_unknown_option_lists_options_and_a_guess() -> None:
    error = parse_error("test-options{cuont=2}")
    assert "unknown option 'cuont'" in str(error)
    assert "test-options" in str(error)
    assert "did you mean 'count'?" in error.hint
    for option in ("count", "ratio", "strict", "label", "mode", "rules", "limit", "tag"):
        assert option in error.hint


def test_unknown_option_of_a_pass_without_options() -> None:
    error = parse_error("test-plain{x=1}")
    assert "unknown option 'x'" in str(error)
    assert "no options" in error.hint


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("test-options{strict=maybe}", ["'strict'", "'maybe'", "boolean"]),
        ("test-options{count=2.5}", ["'count'", "'2.5'", "int"]),
        ("test-options{count=many}", ["'count'", "'many'", "int"]),
        ("test-options{limit=lots}", ["'limit'", "'lots'", "int"]),
        ("test-options{ratio=half}", ["'ratio'", "'half'", "float"]),
        ("test-options{mode=slow}", ["'mode'", "'slow'", "fast", "exact"]),
        ("test-fold{target=tpu}", ["'target'", "'tpu'", "cpu", "cuda"]),
    ],
)
def test_bad_values_name_option_value_and_type(text: str, fragments: list[str]) -> None:
    error = parse_error(text)
    name = text.partition("{")[0]
    assert f"pass '{name}'" in str(error)
    for fragment in fragments:
        assert fragment in full_text(error)


def test_bad_bool_hint() -> None:
    assert "true or false" in parse_error("test-options{strict=2}").hint


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("test-options{count=1", "missing '}'"),
        ("test-options{count=1,cleanup", "missing '}'"),
        ("test-options{count=1}}", "unmatched '}'"),
        ("test-options}", "unmatched '}'"),
        ("test-options{count={1}}", "nested '{'"),
        ("test-options{count=1}{ratio=2.0}", "'}'"),
        ("test-options{count=1}x", "text after '}'"),
    ],
)
def test_unbalanced_or_nested_braces(text: str, fragment: str) -> None:
    assert fragment in str(parse_error(text))


def test_brace_errors_give_the_position() -> None:
    assert "position 21" in str(parse_error("test-options{count=1}}"))
    assert "position 19" in str(parse_error("test-options{count={1}}"))


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_pipeline(text: str) -> None:
    error = parse_error(text)
    assert "empty" in str(error)
    assert "onnxforge passes" in error.hint


@pytest.mark.parametrize("text", ["cleanup,", ",cleanup", "cleanup,,test-plain", "cleanup, ,x"])
def test_stray_comma(text: str) -> None:
    error = parse_error(text)
    assert "empty pass name" in str(error)
    assert "stray comma" in error.hint


@pytest.mark.parametrize("text", ["test-options{count=1,}", "test-options{count=1,2}"])
def test_stray_value_after_a_scalar_option(text: str) -> None:
    error = parse_error(text)
    assert "has no '='" in str(error)
    assert "count" in error.hint


def test_option_given_twice() -> None:
    error = parse_error("test-options{count=1,ratio=0.1,count=2}")
    assert "'count'" in str(error)
    assert "twice" in str(error)


def test_constructor_rejection_becomes_input_error() -> None:
    error = parse_error("collapse-relu{max_rounds=0}")
    assert "collapse-relu" in str(error)
    assert "max_rounds" in str(error)


def test_sequence_with_a_foreign_object() -> None:
    error = parse_error(["cleanup", 42])
    assert "42" in str(error)


# ---------------------------------------------------------------------------------------------
# Property: format -> parse -> format is the identity, and option values survive

# Text values use characters that have no meaning in the grammar; "none" is left out because it
# spells the None of an optional option.
_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=8).filter(
    lambda s: s != "none"
)

_options_pass = st.builds(
    OptionsPass,
    count=st.integers(min_value=-(10**12), max_value=10**12),
    ratio=st.floats(allow_nan=True, allow_infinity=True),
    strict=st.booleans(),
    label=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", max_size=8),
    mode=st.sampled_from(["fast", "exact"]),
    rules=st.lists(_word, max_size=4),
    limit=st.none() | st.integers(min_value=0, max_value=10**6),
    tag=st.none() | _word,
)
_fold_pass = st.builds(
    FoldPass, rules=st.lists(_word, max_size=4), target=st.sampled_from(["cpu", "cuda"])
)
_cleanup_pass = st.builds(
    CleanupPass, deduplicate=st.booleans(), size_limit=st.integers(min_value=1, max_value=10**9)
)
_any_pass = st.one_of(_options_pass, _fold_pass, _cleanup_pass, st.builds(PlainPass))


@settings(max_examples=50, deadline=None)
@given(st.lists(_any_pass, min_size=1, max_size=6))
def test_format_parse_format_is_identity(passes) -> None:
    text = format_pipeline(passes)
    parsed = parse_pipeline(text)
    assert format_pipeline(parsed) == text
    assert [type(p) for p in parsed] == [type(p) for p in passes]
    for original, copy in zip(passes, parsed, strict=True):
        before, after = original.option_values(), copy.option_values()
        assert before.keys() == after.keys()
        for key in before:
            assert values_equal(before[key], after[key]), (text, key, before[key], after[key])
