from ttt_speech import quickstart


def test_quickstart_runs_and_streaming_matches_parallel(capsys) -> None:
    result = quickstart.run(batch_size=1, frames=17)
    assert result["stream_vs_parallel"] <= 1e-5
    assert result["stream_codes"] == [1, 9, 16]
    assert "In-Place TTT in layers [0, 2]" in capsys.readouterr().out
