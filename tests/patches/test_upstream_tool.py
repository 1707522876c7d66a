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
    return [root / "patches" / name / ln.split(" ")[0] for ln in lines if ln and not ln.startswith("#")]


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
    record_hash(root, patch)
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
    record_hash(root, patch)
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
    record_hash(root, patch)
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
    kept = [ln for ln in (root / "patches" / "moshi" / "series").read_text().splitlines(keepends=True)
            if ln.split(" ")[0].strip() != last.name]
    (root / "patches" / "moshi" / "series").write_text("".join(kept))
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


def record_hash(root: Path, patch: Path, name: str = "moshi") -> None:
    """Rewrite the series line of `patch` with its current sha256, as an export would have (a series pulled from
    elsewhere whose patch no longer applies)."""
    import hashlib

    series_file = root / "patches" / name / "series"
    digest = hashlib.sha256(patch.read_bytes()).hexdigest()
    lines = [f"{patch.name}  # sha256:{digest}" if ln.split(" ")[0] == patch.name else ln
             for ln in series_file.read_text().splitlines()]
    series_file.write_text("\n".join(lines) + "\n")


def test_every_series_records_the_hash_of_each_patch() -> None:
    for folder in sorted((REPO / "patches").iterdir()):
        lines = [ln for ln in (folder / "series").read_text().splitlines() if ln and not ln.startswith("#")]
        assert lines and all(re.search(r"  # sha256:[0-9a-f]{64}$", ln) for ln in lines), folder


def test_a_hand_edited_patch_that_still_applies_is_refused(root: Path) -> None:
    assert run_tool(root, "apply", "moshi").returncode == 0
    repo = root / "upstream" / "moshi"
    head = git(repo, "rev-parse", "HEAD")
    patch = series(root)[0]
    text = patch.read_text()
    assert "+            self.layers[-1].layer_idx = layer_idx\n" in text
    patch.write_text(text.replace("layer_idx = layer_idx\n", "layer_idx = layer_idx + 1\n"))
    for command in ("check", "apply"):
        proc = run_tool(root, command, "moshi")
        assert proc.returncode == 1, proc.stdout
        assert f"patches/moshi/{patch.name}: edited by hand" in proc.stderr
        assert "git checkout -- patches/moshi" in proc.stderr
    assert git(repo, "rev-parse", "HEAD") == head  # the checkout was not touched
    patch.write_text(text)  # restored: all is well again
    assert "up to date" in run_tool(root, "apply", "moshi").stdout
    assert run_tool(root, "check", "moshi").returncode == 0


def test_after_a_failed_apply_both_ways_out_work(root: Path) -> None:
    """The issue's reproduction: a patch that does not apply (here recorded in the series, as a pulled series
    would be), then the patch restored."""
    assert run_tool(root, "apply", "moshi").returncode == 0
    repo = root / "upstream" / "moshi"
    patch = series(root)[2]
    series_file = root / "patches" / "moshi" / "series"
    good_patch, good_series = patch.read_text(), series_file.read_text()
    lines = good_patch.splitlines(keepends=True)
    assert "weights_per_step = weights_per_step" in lines[29]
    patch.write_text("".join(lines[:29] + [lines[29].replace("= weights_per_step", "= None")] + lines[30:]))
    record_hash(root, patch)
    failed = run_tool(root, "apply", "moshi")
    assert failed.returncode == 1 and f"patch {patch.name} does not apply" in failed.stderr
    assert git(repo, "rev-parse", "HEAD") == git(repo, "rev-parse", "pristine")
    # "keep them" must not delete the series: the checkout holds nothing to export
    kept = run_tool(root, "export", "moshi")
    assert kept.returncode == 1 and "would delete all" in kept.stderr
    assert patch.read_text() != good_patch and len(series(root)) >= 4 and all(p.is_file() for p in series(root))
    # restored: apply starts over (the checkout at pristine has no commits of anyone's)
    patch.write_text(good_patch)
    series_file.write_text(good_series)
    again = run_tool(root, "apply", "moshi")
    assert again.returncode == 0, again.stderr
    assert git(repo, "rev-list", "--count", "pristine..HEAD").strip() == str(len(series(root)))
    assert run_tool(root, "check", "moshi").returncode == 0


def test_the_drop_them_advice_for_local_commits_works(root: Path) -> None:
    assert run_tool(root, "apply", "moshi").returncode == 0
    repo = root / "upstream" / "moshi"
    target = repo / "moshi" / "modules" / "gating.py"
    target.write_text(target.read_text() + "\n# an experiment\n")
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "wip"],
                   check=True)
    refused = run_tool(root, "apply", "moshi")
    assert refused.returncode == 1
    advice = re.search(r"drop them: `(git -C \S+ reset --hard pristine)`", refused.stderr)
    assert advice
    subprocess.run(advice.group(1).split(), cwd=root, check=True, capture_output=True)
    again = run_tool(root, "apply", "moshi")
    assert again.returncode == 0, again.stderr
    assert git(repo, "rev-list", "--count", "pristine..HEAD").strip() == str(len(series(root)))


def test_export_never_deletes_a_patch_without_replacement(root: Path) -> None:
    assert run_tool(root, "apply", "moshi").returncode == 0
    repo = root / "upstream" / "moshi"
    before = [p.name for p in series(root)]
    git(repo, "reset", "--quiet", "--hard", "HEAD~1")  # the last commit dropped (by accident?)
    refused = run_tool(root, "export", "moshi")
    assert refused.returncode == 1
    assert f"would delete {before[-1]} with no replacement" in refused.stderr
    assert [p.name for p in series(root)] == before and all(p.is_file() for p in series(root))
    on_purpose = run_tool(root, "export", "moshi", "--allow-removal")
    assert on_purpose.returncode == 0, on_purpose.stderr
    assert [p.name for p in series(root)] == before[:-1]
    assert run_tool(root, "check", "moshi").returncode == 0


def test_export_from_a_checkout_behind_the_series_is_refused(root: Path) -> None:
    assert run_tool(root, "apply", "moshi").returncode == 0
    first = series(root)[0]
    text = first.read_text()
    first.write_text(text.replace("Last-Update: ", "Last-Update: 2099-01-01 was ", 1))
    record_hash(root, first)  # a series changed elsewhere (git pull), not yet applied here
    proc = run_tool(root, "export", "moshi")
    assert proc.returncode == 1 and "exporting it would revert the series" in proc.stderr
    assert "2099-01-01" in first.read_text()
