"""`bench/train_step.py --mesh ...`: the step time of meshes against one device, same batch."""

import json

import pytest

from bench.train_step import main, parse_args, parse_meshes


def test_meshes_come_repeated_or_several_after_one_flag():
    args = parse_args(["--mesh", "8,1,1", "2,2,2", "--mesh", "1,4,2;8,1,1", "--devices", "8"])
    assert args.meshes == [(8, 1, 1), (2, 2, 2), (1, 4, 2)]  # duplicates dropped, order kept
    assert args.devices == 8
    assert parse_args([]).meshes == []


@pytest.mark.parametrize("text", ["2,2", "2,x,1", "0,1,1", "2,2,2,1"])
def test_a_bad_mesh_is_one_line(text):
    with pytest.raises(SystemExit, match=f"--mesh '{text}': give three positive sizes"):
        parse_meshes([[text]])


def test_a_mesh_larger_than_the_devices_says_how_many_to_fake(capsys):
    # conftest gives this process 8 devices; 16 are asked for. Refused before any compile.
    assert main(["--config", "tiny", "--mesh", "4,2,2"]) == 2
    err = capsys.readouterr().err
    assert "mesh 4,2,2 needs 16 devices but 8 are available; pass --devices 16" in err


@pytest.mark.slow  # two train-step compiles: ~20 s of CPU
def test_each_mesh_trains_like_one_device_and_reports_its_time_ratio(capsys):
    argv = ["--config", "tiny", "--batch", "8", "--mesh", "1,2,2"]
    assert main([*argv, "--steps", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["mesh"] for r in rows] == ["1x1x1", "1x2x2"]  # the one-device baseline comes first
    assert [r["devices"] for r in rows] == [1, 4]
    assert rows[0]["step_time_ratio"] == 1.0
    for row in rows:
        assert row["batch"] == 8 and row["step_ms"] > 0 and row["step_time_ratio"] > 0
        # Same initial weights, batch and number of steps: the same loss, to float tolerance.
        assert row["final_loss"] == pytest.approx(rows[0]["final_loss"], rel=1e-4)
    assert "ratio: mesh / 1 device" in out and "time / 1 device" in out
