"""scripts/upstream.py on scratch copies of the lock and the series: apply, idempotence, atomicity, refusals."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "scripts" / "upstream.py"
SDIST = REPO / ".cache" / "upstream" / "moshi-0.2.13.tar.gz"


def run_tool(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "MOSHI_SRC": str(SDIST), "TTT_SPEECH_OFFLINE": "1", **env}
    if "LLAMA_OMNI_SRC" not in env:
        full_env.pop("LLAMA_OMNI_SRC", None)
    return subprocess.run([sys.executable, str(TOOL), *args, "--lock", str(root / "upstream.lock"),
                           "--no-install"], capture_output=True, text=True, env=full_env)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def root(tmp_path: Path) -> Path:
    assert SDIST.is_file(), f"{SDIST} missing: run `make apply-patches` first (make test does)"
    shutil.copy(REPO / "upstream.lock", tmp_path / "upstream.lock")
    shutil.copytree(REPO / "patches", tmp_path / "patches")
    return tmp_path


def series(root: Path, name: str = "moshi") -> list[Path]:
    lines = (root / "patches" / name / "series").read_text().splitlines()
    return [root / "patches" / name / ln for ln in lines if ln and not ln.startswith("#")]


def test_apply_then_reapply_is_up_to_date(root: Path) -> None:
    first = run_tool(root, "apply", "moshi")
    assert first.returncode == 0, first.stderr
    repo = root / "upstream" / "moshi"
    n = len(series(root))
    assert n >= 3
    assert git(repo, "rev-list", "--count", "pristine..HEAD").strip() == str(n)
    head = git(repo, "rev-parse", "HEAD")
    second = run_tool(root, "apply", "moshi")
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    assert git(repo, "rev-parse", "HEAD") == head
    assert git(repo, "status", "--porcelain") == ""


def test_same_pin_and_series_give_the_same_commits(root: Path, tmp_path_factory) -> None:
    other = tmp_path_factory.mktemp("other")
    shutil.copy(root / "upstream.lock", other / "upstream.lock")
    shutil.copytree(root / "patches", other / "patches")
    for r in (root, other):
        assert run_tool(r, "apply", "moshi").returncode == 0
    heads = {git(r / "upstream" / "moshi", "rev-parse", "HEAD") for r in (root, other)}
    assert len(heads) == 1


def test_check_applies_every_series_and_writes_nothing(root: Path) -> None:
    proc = run_tool(root, "check")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"moshi: \d+ patch\(es\) apply cleanly to 0\.2\.13", proc.stdout)
    assert "llama-omni: skipped" in proc.stdout
    assert not (root / "upstream").exists()


def test_check_rejects_a_patch_without_its_header(root: Path) -> None:
    patch = series(root)[0]
    patch.write_text(re.sub(r"^Forwarded: .*\n", "", patch.read_text(), flags=re.M))
    proc = run_tool(root, "check", "moshi")
    assert proc.returncode == 1
    assert f"{patch.name}: trailer Forwarded: is missing" in proc.stderr


def test_a_hunk_that_no_longer_applies_leaves_the_checkout_pristine(root: Path) -> None:
    assert run_tool(root, "apply", "moshi").returncode == 0
    repo = root / "upstream" / "moshi"
    # make the last patch's last hunk expect context the pin does not have
    patch = series(root)[-1]
    text = patch.read_text()
    hunks = list(re.finditer(r"^@@ -(\d+),\d+ \+\d+,\d+ @@.*\n", text, flags=re.M))
    last = hunks[-1]
    context_line = text[last.end():].split("\n", 1)[0]
    assert context_line.startswith(" ")
    patch.write_text(text[:last.end()] + " this line is not in moshi" + text[last.end() + len(context_line):])
    proc = run_tool(root, "apply", "moshi")
    assert proc.returncode == 1
    assert f"patch {patch.name} does not apply" in proc.stderr
    assert f"hunk #{len([h for h in hunks if h.start() > text.rfind('diff --git', 0, last.start())])}" in proc.stderr
    assert f"@@ -{last.group(1)}," in proc.stderr
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "rev-parse", "HEAD") == git(repo, "rev-parse", "pristine")


def test_a_garbage_patch_is_named_and_nothing_is_applied(root: Path) -> None:
    patch = series(root)[1]
    text = patch.read_text()
    at = text.index("\n@@ ")
    patch.write_text(text[:at] + "\n@@ garbage @@\n%%%% not a diff\n" + text[at + 200:])
    proc = run_tool(root, "apply", "moshi")
    assert proc.returncode == 1
    assert f"patch {patch.name} does not apply" in proc.stderr
    repo = root / "upstream" / "moshi"
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "rev-parse", "HEAD") == git(repo, "rev-parse", "pristine")


def test_a_checksum_mismatch_is_refused(root: Path, tmp_path_factory) -> None:
    bad = tmp_path_factory.mktemp("bad") / SDIST.name
    bad.write_bytes(SDIST.read_bytes() + b"\0")
    proc = run_tool(root, "apply", "moshi", MOSHI_SRC=str(bad))
    assert proc.returncode == 1
    assert "does not match upstream.lock's f0c83aea" in proc.stderr
    assert not (root / "upstream" / "moshi").exists()


def test_a_tree_that_is_not_the_pin_is_refused(root: Path, tmp_path_factory) -> None:
    fake = tmp_path_factory.mktemp("fake-omni")
    (fake / "README.md").write_text("not LLaMA-Omni\n")
    proc = run_tool(root, "apply", "llama-omni", LLAMA_OMNI_SRC=str(fake))
    assert proc.returncode == 1
    assert "upstream.lock pins 32054c7f" in proc.stderr
    assert not (root / "upstream" / "llama-omni").exists()


def test_a_dirty_checkout_is_not_overwritten(root: Path) -> None:
    assert run_tool(root, "apply", "moshi").returncode == 0
    repo = root / "upstream" / "moshi"
    edited = repo / "moshi" / "models" / "lm.py"
    edited.write_text(edited.read_text() + "# my local experiment\n")
    (repo / "notes.txt").write_text("untracked\n")
    proc = run_tool(root, "apply", "moshi")
    assert proc.returncode == 1
    assert "uncommitted changes" in proc.stderr and "moshi/models/lm.py" in proc.stderr
    assert "notes.txt" in proc.stderr
    assert edited.read_text().endswith("# my local experiment\n")
    assert (repo / "notes.txt").exists()


def test_unexported_commits_are_refused_then_exported(root: Path) -> None:
    assert run_tool(root, "apply", "moshi").returncode == 0
    repo = root / "upstream" / "moshi"
    target = repo / "moshi" / "modules" / "gating.py"
    target.write_text(target.read_text() + "\n# a comment\n")
    msg = ("fix: a test change\n\nWhat and why: this commit only exists in a test of the export flow.\n"
           "It adds a comment.\n\nRelied on by: nothing.\n\nUpstream-Base: moshi 0.2.13\nForwarded: no\n"
           "Last-Update: 2026-11-22\n")
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", msg],
                   check=True)
    refused = run_tool(root, "apply", "moshi")
    assert refused.returncode == 1
    assert "commits that are not in" in refused.stderr and "fix: a test change" in refused.stderr
    n_before = len(series(root))
    exported = run_tool(root, "export", "moshi")
    assert exported.returncode == 0, exported.stderr
    assert len(series(root)) == n_before + 1
    assert "fix-a-test-change" in series(root)[-1].name
    again = run_tool(root, "apply", "moshi")
    assert "up to date" in again.stdout
    assert run_tool(root, "export", "moshi").stdout.strip().endswith("matches the checkout")
    assert run_tool(root, "check", "moshi").returncode == 0


def test_a_changed_series_is_reapplied(root: Path) -> None:
    assert run_tool(root, "apply", "moshi").returncode == 0
    last = series(root)[-1]
    lines = (root / "patches" / "moshi" / "series").read_text().replace(last.name + "\n", "")
    (root / "patches" / "moshi" / "series").write_text(lines)
    last.unlink()
    proc = run_tool(root, "apply", "moshi")
    assert proc.returncode == 0, proc.stderr
    assert "series changed" in proc.stdout
    repo = root / "upstream" / "moshi"
    assert git(repo, "rev-list", "--count", "pristine..HEAD").strip() == str(len(series(root)))


def test_an_unlisted_patch_is_refused(root: Path) -> None:
    (root / "patches" / "moshi" / "0099-stray.patch").write_text("stray\n")
    proc = run_tool(root, "apply", "moshi")
    assert proc.returncode == 1
    assert "does not list 0099-stray.patch" in proc.stderr


def test_llama_omni_is_skipped_offline_with_a_reason(root: Path) -> None:
    proc = run_tool(root, "apply")
    assert proc.returncode == 0, proc.stderr
    skipped = [ln for ln in proc.stdout.splitlines() if ln.startswith("llama-omni:")]
    assert len(skipped) == 1 and "skipped" in skipped[0] and "LLAMA_OMNI_SRC" in skipped[0]
