"""The pass registry: what @register accepts, how unknown names fail, and the plug-in path."""

from __future__ import annotations

import importlib.metadata
import logging
import subprocess
import sys
import textwrap

import pytest

from onnxforge.errors import InputError
from onnxforge.passes import (
    CleanupPass,
    Pass,
    PassResult,
    Semantics,
    available_passes,
    get_pass,
    register,
)
from onnxforge.passes import registry as registry_module
from onnxforge.samples.custom_pass import CollapseReluPass


def make_pass_class(name: str | None, **overrides) -> type[Pass]:
    """A fresh, unregistered pass class; ``overrides`` replace (or, as None, remove) attributes."""
    namespace = {
        "__module__": __name__,  # type() of an ABCMeta class would say "abc"
        "name": name,
        "summary": "A pass made by the registry tests.",
        "semantics": Semantics.EXACT,
        "call": lambda self, model: PassResult(model, False),
    }
    if name is None:
        del namespace["name"]
    for key, value in overrides.items():
        if value is None:
            namespace.pop(key)
        else:
            namespace[key] = value
    return type("MadePass", (Pass,), namespace)


@pytest.mark.parametrize("thing", [42, "cleanup", object, CleanupPass(), len])
def test_register_rejects_non_pass_classes(thing) -> None:
    with pytest.raises(TypeError, match="Pass subclass"):
        register(thing)


@pytest.mark.parametrize("attr", ["name", "summary", "semantics"])
@pytest.mark.parametrize("how", ["missing", "empty"])
def test_register_rejects_missing_class_attributes(attr: str, how: str) -> None:
    overrides = {"name": f"test-registry-no-{attr}", attr: None if how == "missing" else ""}
    cls = make_pass_class(**overrides)
    with pytest.raises(TypeError, match=f"'{attr}'"):
        register(cls)
    assert f"test-registry-no-{attr}" not in available_passes()


def test_register_rejects_options_without_default() -> None:
    def __init__(self, *, limit: int, ratio: float = 0.5) -> None:
        self.limit, self.ratio = limit, ratio

    cls = make_pass_class("test-registry-no-default", __init__=__init__)
    with pytest.raises(TypeError, match="'limit' needs a default"):
        register(cls)
    assert "test-registry-no-default" not in available_passes()


def test_register_rejects_required_positional_parameters() -> None:
    def __init__(self, limit: int) -> None:
        self.limit = limit

    cls = make_pass_class("test-registry-positional", __init__=__init__)
    with pytest.raises(TypeError):
        register(cls)


def test_register_rejects_a_name_taken_by_another_class() -> None:
    impostor = make_pass_class("cleanup")
    with pytest.raises(TypeError, match="onnxforge.passes.cleanup.CleanupPass"):
        register(impostor)
    assert get_pass("cleanup") is CleanupPass


def test_register_again_is_harmless_and_returns_the_class() -> None:
    cls = make_pass_class("test-registry-twice")
    assert register(cls) is cls
    assert register(cls) is cls
    assert get_pass("test-registry-twice") is cls
    assert register(CleanupPass) is CleanupPass


def test_register_works_as_a_decorator() -> None:
    @register
    class DecoratedPass(Pass):
        name = "test-registry-decorated"
        summary = "Registered with the decorator."
        semantics = Semantics.REASSOCIATING

        def call(self, model):
            return PassResult(model, False)

    assert get_pass("test-registry-decorated") is DecoratedPass
    assert available_passes()["test-registry-decorated"] is DecoratedPass


def test_get_pass_unknown_name() -> None:
    with pytest.raises(InputError) as info:
        get_pass("cleanpu")
    error = info.value
    assert "unknown pass 'cleanpu'" in str(error)
    assert "did you mean 'cleanup'?" in error.hint
    assert "collapse-relu" in error.hint
    assert "onnxforge passes" in error.hint


def test_available_passes_is_sorted_and_complete() -> None:
    passes = available_passes()
    assert passes["cleanup"] is CleanupPass
    assert passes["collapse-relu"] is CollapseReluPass
    assert list(passes) == sorted(passes)
    for name, cls in passes.items():
        assert cls.name == name


def test_available_passes_returns_a_copy() -> None:
    passes = available_passes()
    passes.pop("cleanup")
    assert "cleanup" in available_passes()


def test_collapse_relu_is_declared_as_an_entry_point() -> None:
    entry_points = importlib.metadata.entry_points(group=registry_module.ENTRY_POINT_GROUP)
    by_name = {ep.name: ep for ep in entry_points}
    assert registry_module.ENTRY_POINT_GROUP == "onnxforge.passes"
    assert "collapse-relu" in by_name
    assert by_name["collapse-relu"].value == "onnxforge.samples.custom_pass:CollapseReluPass"
    assert by_name["collapse-relu"].load() is get_pass("collapse-relu")
    cls = get_pass("collapse-relu")
    assert (
        f"{cls.__module__}.{cls.__qualname__}" == "onnxforge.samples.custom_pass.CollapseReluPass"
    )


def test_collapse_relu_arrives_through_the_entry_point_in_a_fresh_interpreter() -> None:
    # Importing onnxforge.passes must not import the sample: only the entry point brings it in.
    script = textwrap.dedent(
        """
        import sys
        from onnxforge.passes import available_passes
        assert "onnxforge.samples.custom_pass" not in sys.modules, "imported too early"
        cls = available_passes()["collapse-relu"]
        assert "onnxforge.samples.custom_pass" in sys.modules
        sys.stdout.write(cls.__module__ + "." + cls.__qualname__)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "onnxforge.samples.custom_pass.CollapseReluPass"


class _FakeEntryPoint:
    def __init__(self, value: str, load) -> None:
        self.value = value
        self._load = load

    def load(self):
        return self._load()


def test_a_broken_plugin_is_logged_and_skipped(monkeypatch, caplog) -> None:
    good = make_pass_class("test-registry-plugin")

    def broken():
        raise ImportError("no module named 'missing_plugin'")

    fakes = [
        _FakeEntryPoint("missing_plugin:Pass", broken),
        _FakeEntryPoint("some_module", lambda: registry_module),  # a module: not registered
        _FakeEntryPoint("plugin:GoodPass", lambda: good),
    ]

    def fake_entry_points(*, group: str):
        assert group == "onnxforge.passes"
        return fakes

    monkeypatch.setattr(registry_module, "_entry_points_loaded", False)
    monkeypatch.setattr(registry_module.importlib.metadata, "entry_points", fake_entry_points)
    with caplog.at_level(logging.WARNING, logger=registry_module.__name__):
        passes = available_passes()
    assert passes["test-registry-plugin"] is good
    assert "cleanup" in passes
    assert any("missing_plugin:Pass" in r.getMessage() for r in caplog.records)
