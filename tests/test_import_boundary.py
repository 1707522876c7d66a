"""The layering promise (README, docs/STYLE): only `ttt_speech/integrations/` imports moshi or transformers.

Every module of the package outside `integrations/` is parsed (not imported) and any import of those packages is
reported with its file and line, module-level and function-level alike, `importlib.import_module("moshi...")` too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "overlay" / "ttt_speech"
FORBIDDEN = ("moshi", "transformers")
ALLOWED_DIR = PACKAGE / "integrations"


def _top(name: str | None) -> str:
    return (name or "").split(".")[0]


def forbidden_imports(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """(line, statement) for every import of a FORBIDDEN package in `source`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if _top(alias.name) in FORBIDDEN]
            if names:
                found.append((node.lineno, f"import {', '.join(names)}"))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and _top(node.module) in FORBIDDEN:
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            target = node.args[0].value
            if called in ("import_module", "__import__") and isinstance(target, str) and _top(target) in FORBIDDEN:
                found.append((node.lineno, f"{called}({target!r})"))
    return sorted(found)


def _modules_outside_integrations() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if ALLOWED_DIR not in p.parents)


def test_checker_sees_every_form():
    """The checker itself: module-level, function-level, dotted, aliased and importlib forms are all caught;
    look-alike names (`moshi_codes`, `ttt_speech.integrations.moshi`, relative imports) are not."""
    source = "\n".join([
        "import os, moshi",
        "from moshi.models.lm import _delay_sequence",
        "def f():",
        "    import transformers.models.llama as llama",
        "    from transformers import AutoConfig",
        "    return importlib.import_module('moshi.models')",
        "import moshi_codes",
        "from ttt_speech.integrations.moshi import build_lm",
        "from .moshi import x",
        "import transformers_extra",
    ])
    assert [line for line, _ in forbidden_imports(source)] == [1, 2, 4, 5, 6]


def test_package_is_found():
    modules = _modules_outside_integrations()
    names = {p.relative_to(PACKAGE).as_posix() for p in modules}
    assert {"cli.py", "quickstart.py", "train/model.py", "eval/nll.py"} <= names, names
    assert not any(n.startswith("integrations/") for n in names)


def test_only_integrations_import_moshi_or_transformers():
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{line}: {stmt}"
                 for p in _modules_outside_integrations()
                 for line, stmt in forbidden_imports(p.read_text(), str(p))]
    if offenders:
        pytest.fail("moshi/transformers imported outside ttt_speech/integrations/ (move the use behind a function "
                    "in an integrations/ module):\n" + "\n".join(offenders))


def test_each_private_moshi_name_is_imported_in_one_module():
    """A private moshi name (`_lm_kwargs`, `_delay_sequence`, ...) is wrapped in one integrations module, where the
    docstring says what breaks when upstream renames it; a second importer spreads that risk."""
    importers: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and _top(node.module) == "moshi":
                for alias in node.names:
                    if alias.name.startswith("_"):
                        importers.setdefault(alias.name, []).append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    spread = {name: where for name, where in importers.items() if len(where) > 1}
    assert not spread, f"private moshi names imported in more than one place (wrap them once): {spread}"
    assert "_delay_sequence" in importers and "_lm_kwargs" in importers, importers  # the walk sees them
