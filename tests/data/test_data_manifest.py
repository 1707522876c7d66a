import json
import re

import pytest
from data_helpers import write_recording

from ttt_speech.data.manifest import (
    Word,
    build_manifest,
    read_alignments,
    read_manifest,
    write_alignments,
    write_manifest,
)


def make_pair(root, name="x", seconds=1.0):
    path, duration = write_recording(root / f"{name}.wav", seconds)
    return path, duration


def test_manifest_reads_entries_relative_to_its_folder(tmp_path) -> None:
    a, da = make_pair(tmp_path / "audio", "a")
    b, db = make_pair(tmp_path / "audio", "b", 2.0)
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [(a, da), (b, db)])
    manifest.write_text(manifest.read_text() + "\n   \n")  # trailing blank lines are fine
    assert json.loads(manifest.read_text().splitlines()[0])["path"] == "audio/a.wav"
    entries = read_manifest(manifest)
    assert [e.path for e in entries] == [a.resolve(), b.resolve()]
    assert [e.duration for e in entries] == [da, db]
    assert [e.line for e in entries] == [1, 2]
    assert entries[1].alignment_path == b.resolve().with_suffix(".json")
    assert entries[1].where == f"{manifest}:2"


@pytest.mark.parametrize(("line", "message"), [
    ('{"path": "x.wav", "duration": 1.0', "invalid JSON"),
    ('["x.wav", 1.0]', "expected {\"path\""),
    ('{"path": "x.wav"}', "missing ['duration']"),
    ('{"duration": 1.0}', "missing ['path']"),
    ('{"path": "x.wav", "duration": "1.0"}', "'duration' must be a positive number"),
    ('{"path": "x.wav", "duration": -2}', "'duration' must be a positive number"),
    ('{"path": "x.wav", "duration": NaN}', "'duration' must be a positive number"),
    ('{"path": 3, "duration": 1.0}', "'path' must be a non-empty string"),
    ('{"path": "missing.wav", "duration": 1.0}', "file not found"),
])
def test_malformed_manifest_names_file_and_line(tmp_path, line, message) -> None:
    make_pair(tmp_path)
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"path": "x.wav", "duration": 1.0}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{manifest}:3: ") + ".*" + re.escape(message)):
        read_manifest(manifest)


def test_missing_alignment_file_and_empty_manifest(tmp_path) -> None:
    path, duration = make_pair(tmp_path)
    path.with_suffix(".json").unlink()
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [(path, duration)])
    with pytest.raises(ValueError, match=re.escape(f"{manifest}:1: file not found: {path.with_suffix('.json')}")):
        read_manifest(manifest)
    assert read_manifest(manifest, check_files=False)[0].path == path.resolve()
    manifest.write_text("\n")
    with pytest.raises(ValueError, match="no entries"):
        read_manifest(manifest)
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "nope.jsonl")


def test_alignments_round_trip(tmp_path) -> None:
    words = [Word("Hello,", 0.5, 0.9, "SPEAKER_MAIN"), Word("there", 1.0, 1.25, "SPEAKER_OTHER"),
             Word("é", 2.0, 2.0, "SPEAKER_MAIN")]
    write_alignments(tmp_path / "a.json", words)
    assert read_alignments(tmp_path / "a.json") == words
    (tmp_path / "b.json").write_text('{"text_conditions": {"x": [1, 2]}, "alignments": [["hi", [0, 1], "S"]]}')
    assert read_alignments(tmp_path / "b.json") == [Word("hi", 0.0, 1.0, "S")]
    write_alignments(tmp_path / "c.json", [])
    assert read_alignments(tmp_path / "c.json") == []


@pytest.mark.parametrize(("bad", "problem"), [
    ('["hi", [0.5], "SPEAKER_MAIN"]', "expected [word, [start_sec, end_sec], speaker]"),
    ('["hi", [0.5, "1"], "SPEAKER_MAIN"]', "expected [word, [start_sec, end_sec], speaker]"),
    ('["hi", [0.5, 1.0]]', "expected [word, [start_sec, end_sec], speaker]"),
    ('[3, [0.5, 1.0], "SPEAKER_MAIN"]', "expected [word, [start_sec, end_sec], speaker]"),
    ('{"word": "hi"}', "expected [word, [start_sec, end_sec], speaker]"),
    ('["hi", [-0.5, 1.0], "SPEAKER_MAIN"]', "start time must be >= 0"),
])
def test_malformed_alignment_names_file_and_line(tmp_path, bad, problem) -> None:
    path = tmp_path / "a.json"
    path.write_text('{\n  "other": {"alignments": 1},\n  "alignments": [\n    ["ok", [0.1, 0.2], "SPEAKER_MAIN"],\n'
                    f'    {bad},\n    ["ok", [1.1, 1.2], "SPEAKER_MAIN"]\n  ]\n}}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:5: alignments[1]: {problem}")):
        read_alignments(path)
    path.write_text('{"alignments": [["ok", [0.1, 0.2], "S"], ' + bad + "]}")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: alignments[1]: {problem}")):
        read_alignments(path)


def test_alignment_file_not_json_or_wrong_shape(tmp_path) -> None:
    path = tmp_path / "a.json"
    path.write_text('{"alignments": [\n  ["hi", [0.1, 0.2], "S"]\n  ["there", [0.3, 0.4], "S"]\n]}')
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: invalid JSON")):
        read_alignments(path)
    path.write_text('{"words": []}')
    with pytest.raises(ValueError, match=re.escape(f'{path}:1: expected an object {{"alignments"')):
        read_alignments(path)


def test_build_manifest_lists_files_with_alignments(tmp_path) -> None:
    a, da = make_pair(tmp_path / "d", "a", 1.5)
    make_pair(tmp_path / "d" / "sub", "b", 0.5)
    orphan, _ = make_pair(tmp_path / "d", "orphan")
    orphan.with_suffix(".json").unlink()
    assert build_manifest(tmp_path / "d", tmp_path / "m.jsonl") == 2
    entries = read_manifest(tmp_path / "m.jsonl")
    assert [e.path.name for e in entries] == ["a.wav", "b.wav"]
    assert entries[0].duration == pytest.approx(da)
