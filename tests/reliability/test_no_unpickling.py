"""No pickle is ever unpickled beyond ``torch.load(weights_only=True)``: checked in the source.

The behaviour is tested where the files come in (``tests/frontend/test_specs.py``: state dicts
and ``.pt2`` archives carrying a payload that would touch a marker file are refused, and the
marker never appears; ``test_corpus.py`` here: a pickle or ``torch.save`` archive renamed
``.onnx`` is refused, unread). This test reads every module of the onnxforge package and fails
on any call that can unpickle without that restriction, so that new code cannot add one.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import onnxforge

ROOT = pathlib.Path(onnxforge.__file__).resolve().parent.parent
PACKAGE_FOLDERS = ("onnxforge", "frontend", "backend", "passes", "samples")

# Calls that unpickle whatever they are given.
FORBIDDEN = {
    "pickle.load",
    "pickle.loads",
    "_pickle.load",
    "_pickle.loads",
    "cPickle.load",
    "cPickle.loads",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "joblib.load",
    "shelve.open",
    "pandas.read_pickle",
    "pd.read_pickle",
    "torch.jit.load",
    "torch.serialization.load",
    "numpy.lib.format.read_array",
}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def _refuses_every_class(cls: ast.ClassDef) -> bool:
    """A pickle.Unpickler subclass whose find_class raises whatever it is asked for."""
    for item in cls.body:
        if isinstance(item, ast.FunctionDef) and item.name == "find_class":
            return len(item.body) == 1 and isinstance(item.body[0], ast.Raise)
    return False


def audit(source: str, filename: str = "<source>") -> list[str]:
    """Every place in ``source`` that can unpickle beyond weights-only loading."""
    tree = ast.parse(source, filename)
    problems: list[str] = []
    safe_unpicklers = {
        cls.name
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef)
        and any(_dotted(base) == "pickle.Unpickler" for base in cls.bases)
        and _refuses_every_class(cls)
    }
    guarded: set[int] = set()  # calls inside `with _weights_only_unpickling():`
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
            isinstance(item.context_expr, ast.Call)
            and _dotted(item.context_expr.func) == "_weights_only_unpickling"
            for item in node.items
        ):
            guarded.update(id(inner) for inner in ast.walk(node))
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if _dotted(base) == "pickle.Unpickler" and node.name not in safe_unpicklers:
                    problems.append(f"{where}: {node.name} unpickles with pickle.Unpickler")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in FORBIDDEN:
            problems.append(f"{where}: {name}(...) unpickles without restriction")
        elif name == "torch.load" and _keyword(node, "weights_only") is not True:
            problems.append(f"{where}: torch.load(...) without weights_only=True")
        elif name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") is not False:
            problems.append(f"{where}: {name}(...) without allow_pickle=False")
        elif name == "torch.export.load" and id(node) not in guarded:
            problems.append(f"{where}: torch.export.load(...) outside _weights_only_unpickling()")
        elif name == "pickle.Unpickler":
            problems.append(f"{where}: pickle.Unpickler(...) unpickles without restriction")
    return problems


def package_sources() -> list[pathlib.Path]:
    return sorted(path for folder in PACKAGE_FOLDERS for path in (ROOT / folder).rglob("*.py"))


def test_the_package_has_sources_to_audit():
    names = {path.name for path in package_sources()}
    assert {"specs.py", "io.py", "validate.py", "cli.py"} <= names


def test_no_module_unpickles_beyond_weights_only():
    problems = [
        problem
        for path in package_sources()
        for problem in audit(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert problems == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(path)",
        "import torch\ntorch.load(path, weights_only=False)",
        "import pickle\npickle.loads(data)",
        "import numpy as np\nnp.load(path)",
        "import numpy as np\nnp.load(path, allow_pickle=True)",
        "import torch\ntorch.export.load(path)",
        "import torch\ntorch.jit.load(path)",
        "import pickle\nclass U(pickle.Unpickler):\n    pass",
    ],
)
def test_the_audit_catches_each_way_to_unpickle(snippet):
    assert audit(snippet)


def test_the_audit_accepts_the_safe_forms():
    snippet = (
        "import pickle, torch, numpy as np\n"
        "torch.load(path, weights_only=True)\n"
        "np.load(path, allow_pickle=False)\n"
        "class Refuse(pickle.Unpickler):\n"
        "    def find_class(self, module, name):\n"
        "        raise pickle.UnpicklingError(name)\n"
        "with _weights_only_unpickling():\n"
        "    torch.export.load(path)\n"
    )
    assert audit(snippet) == []
