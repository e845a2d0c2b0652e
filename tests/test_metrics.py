"""MetricWriter (JSON lines, TensorBoard events, PNGs; no-op when disabled) and Progress."""

from __future__ import annotations

import io
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from dalle_jax.metrics import MetricWriter, image_path, to_host_scalars
from dalle_jax.progress import Progress


def read_events(tb_dir) -> list[event_pb2.Event]:
    """Parses TensorBoard event files (TFRecord framing: length, crc, payload, crc)."""
    files = sorted(tb_dir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {tb_dir}"
    events = []
    for path in files:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            events.append(event_pb2.Event.FromString(payload))
            offset += 12 + length + 4
    return events


def test_writes_json_lines_tensorboard_scalars_and_images(tmp_path):
    grid = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    with MetricWriter(tmp_path, enabled=True) as writer:
        writer.write_scalars(10, {"loss": jnp.float32(1.5), "count": jnp.int32(3), "lr": 0.01})
        writer.write_scalars(20, {"loss": jnp.array([0.25])}, split="eval")
        writer.write_images(10, {"reconstructions": jnp.asarray(grid)})

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records == [
        {"step": 10, "split": "train", "loss": 1.5, "count": 3, "lr": 0.01},
        {"step": 20, "split": "eval", "loss": 0.25},
    ]
    assert isinstance(records[0]["count"], int) and isinstance(records[0]["loss"], float)

    png = tmp_path / "images" / "reconstructions_0000010.png"
    assert str(png) == image_path(tmp_path, "reconstructions", 10)
    np.testing.assert_array_equal(np.asarray(Image.open(png)), grid)

    scalars, images = {}, {}
    for event in read_events(tmp_path / "tb"):
        for value in event.summary.value:
            if value.HasField("image"):
                images[(value.tag, event.step)] = value.image
            else:
                scalars[(value.tag, event.step)] = value.simple_value
    assert scalars == {
        ("train/loss", 10): 1.5,
        ("train/count", 10): 3.0,
        ("train/lr", 10): pytest.approx(0.01),
        ("eval/loss", 20): 0.25,
    }
    image = images[("reconstructions", 10)]
    assert (image.height, image.width) == (6, 10)
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    np.testing.assert_array_equal(decoded, grid)


def test_appends_across_writers_like_a_resumed_run(tmp_path):
    for step in (1, 2):
        with MetricWriter(tmp_path, enabled=True) as writer:
            writer.write_scalars(step, {"loss": float(step)})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert steps == [1, 2]


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricWriter(workdir, enabled=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_images(1, {"grid": np.zeros((2, 2, 3), np.uint8)})
    assert not workdir.exists()


def test_default_enabled_on_process_zero(tmp_path):
    with MetricWriter(tmp_path) as writer:  # a single-process run is process 0
        assert writer.enabled


def test_rejects_non_scalars_and_non_uint8_images(tmp_path):
    with pytest.raises(ValueError, match="'loss' must be a scalar"):
        to_host_scalars({"loss": jnp.zeros(3)})
    with (
        MetricWriter(tmp_path, enabled=True) as writer,
        pytest.raises(ValueError, match=r"'grid' must be uint8 \[H, W, C\]"),
    ):
        writer.write_images(1, {"grid": np.zeros((2, 2, 3), np.float32)})


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_metrics_on_a_terminal():
    out = FakeTerminal()
    with Progress(total=10, initial=2, desc="vqvae", process_index=0, file=out) as progress:
        assert progress.enabled
        progress.update(3)
        progress.set_metrics({"loss": jnp.float32(0.123456), "step_count": 5})
        progress.write("a log line")
    text = out.getvalue()
    assert "vqvae" in text and "5/10" in text
    assert "loss=0.1235, step_count=5" in text and "a log line" in text


def test_progress_is_off_on_other_processes_and_in_pipes():
    piped = io.StringIO()
    with Progress(total=10, process_index=0, file=piped) as progress:
        assert not progress.enabled
        progress.update()
        progress.set_metrics({"loss": 1.0})
        progress.write("plain line")
    assert piped.getvalue() == "plain line\n"

    forced = io.StringIO()
    with Progress(total=10, process_index=0, file=forced, force=True) as progress:
        progress.update()
    assert "1/10" in forced.getvalue()

    other = FakeTerminal()
    with Progress(total=10, process_index=1, file=other, force=True) as progress:
        assert not progress.enabled
        progress.update()
        progress.write("not from process 1")
    assert other.getvalue() == ""
