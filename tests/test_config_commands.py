"""Configs, docs and docstrings name only commands that exist: every `ttt-speech CMD [SUB]` (in the Markdown's code,
and anywhere in configs/ and the package and scripts' sources) is a subcommand of the CLI, SUB one of CMD's
subcommands where CMD has them; every `python -m ttt_speech.X` is a runnable module."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from ttt_speech.cli import main

REPO = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"ttt-speech((?: +[a-z][a-z-]*){1,2})")
MODULE = re.compile(r"python -m (ttt_speech(?:\.[a-z_]+)*)")
FENCE = re.compile(r"```.*?```", re.S)
INLINE = re.compile(r"`[^`\n]+`")
SUBCOMMANDS = re.compile(r"positional arguments:\n +\{([a-z,-]+)\}")  # argparse's help of a command with subcommands


def _code_text(path: Path) -> str:
    """The text where a command may be named: a Markdown file's fenced blocks and inline code; any other file
    whole."""
    text = path.read_text()
    if path.suffix != ".md":
        return text
    return "\n".join(FENCE.findall(text) + INLINE.findall(FENCE.sub("", text)))


def _sources() -> list[Path]:
    return sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md"), *(REPO / "configs").glob("*.yaml"),
                   *(REPO / "overlay" / "ttt_speech").rglob("*.py"), *(REPO / "scripts").glob("*.py")])


def _named() -> tuple[dict[tuple[str, ...], list[str]], dict[str, list[str]]]:
    commands: dict[tuple[str, ...], list[str]] = {}
    modules: dict[str, list[str]] = {}
    for path in _sources():
        text = _code_text(path)
        where = str(path.relative_to(REPO))
        for m in COMMAND.finditer(text):
            commands.setdefault(tuple(m.group(1).split()), []).append(where)
        for m in MODULE.finditer(text):
            modules.setdefault(m.group(1), []).append(where)
    return commands, modules


def _help(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    out = capsys.readouterr()
    return exit_.value.code, out.out + out.err


def test_named_commands_exist(capsys):
    commands, modules = _named()
    assert ("data", "encode") in commands and ("finetune",) in {c[:1] for c in commands}  # the scan sees them
    missing = []
    for words, where in sorted(commands.items()):
        code, out = _help([words[0]], capsys)
        if code != 0:
            missing.append(f"ttt-speech {words[0]} (in {', '.join(sorted(set(where)))})")
            continue
        choices = SUBCOMMANDS.search(out)
        if choices and len(words) > 1 and words[1] not in choices.group(1).split(","):
            missing.append(f"ttt-speech {' '.join(words)} (in {', '.join(sorted(set(where)))}); "
                           f"{words[0]} has {choices.group(1)}")
    for module, where in sorted(modules.items()):
        if importlib.util.find_spec(module) is None or (
                importlib.util.find_spec(module).submodule_search_locations is not None
                and importlib.util.find_spec(f"{module}.__main__") is None):
            missing.append(f"python -m {module} (in {', '.join(sorted(set(where)))})")
    assert not missing, "named but not a command:\n" + "\n".join(missing)


def test_the_check_sees_a_wrong_name(capsys):
    """The check itself: a subcommand or a sub-subcommand that does not exist is caught."""
    assert _help(["finetune"], capsys)[0] == 0
    with pytest.raises(SystemExit) as exit_:
        main(["encode", "--help"])
    assert exit_.value.code == 2
    assert SUBCOMMANDS.search(_help(["data"], capsys)[1]).group(1).split(",") == ["librilight", "manifest", "encode"]
    assert SUBCOMMANDS.search(_help(["finetune"], capsys)[1]) is None  # its {slurm,local,debug} is an option's
