"""MetricsLogger files (JSON lines, TensorBoard events), resume truncation, plots, FLOP counting."""

import glob
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from postrl.metrics import (MetricsLogger, mfu, model_flops_per_token, peak_flops, plot_metrics,
                            read_metrics)


def _strict_json(line):
  def bad(const):
    raise ValueError(f"not JSON: {const}")
  return json.loads(line, parse_constant=bad)


def _events(logdir):
  """All Event protos of the TensorBoard event files under ``logdir`` (TFRecord framing:
  uint64 length, uint32 crc, payload, uint32 crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12:pos + 12 + n])
      events.append(event)
      pos += 12 + n + 4
  return events


def _scalars(logdir):
  """{tag: [(step, value), ...]} of the scalar summaries (simple_value or a float tensor)."""
  out = {}
  for e in _events(logdir):
    for v in e.summary.value:
      value = v.simple_value if v.WhichOneof("value") == "simple_value" else v.tensor.float_val[0]
      out.setdefault(v.tag, []).append((e.step, value))
  return out


def test_jsonl_lines_written_flushed_and_readable(tmp_path):
  logger = MetricsLogger(tmp_path, total_steps=10, progress=False, tensorboard=False)
  logger.write(1, {"loss": 2.5, "pg/clipfrac": np.float32(0.25), "tokens": 128})
  logger.write(2, {"loss": jnp.float32(1.5), "lr": jnp.array([1e-3]), "note": "warmup", "ok": True})
  # Flushed at once: readable while the logger is still open (a crash loses nothing).
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [_strict_json(l) for l in lines] == read_metrics(tmp_path / "metrics.jsonl")
  assert read_metrics(tmp_path / "metrics.jsonl") == [
      {"step": 1, "loss": 2.5, "pg/clipfrac": 0.25, "tokens": 128},
      {"step": 2, "loss": 1.5, "lr": pytest.approx(1e-3), "note": "warmup", "ok": True}]
  with pytest.raises(TypeError, match="'logits' must be a scalar"):
    logger.write(3, {"logits": np.zeros((2, 3))})
  logger.close()
  assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nan_and_inf_are_null(tmp_path):
  with MetricsLogger(tmp_path, total_steps=3, progress=False) as logger:
    logger.write(1, {"loss": float("nan"), "grad/l2": np.float32("inf"),
                     "kl": jnp.float32(jnp.nan)})
    logger.write(2, {"loss": 1.0})
  line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
  assert _strict_json(line) == {"step": 1, "loss": None, "grad/l2": None, "kl": None}
  assert _scalars(tmp_path / "tensorboard")["loss"] == [(2, 1.0)]  # NaN skipped, not a broken point


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
  with MetricsLogger(tmp_path, total_steps=3, progress=False) as logger:
    for step in (1, 2, 3):
      logger.write(step, {"loss": 1.0 / step, "eval/accuracy": 0.5})
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  scalars = _scalars(tmp_path / "tensorboard")
  assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
  np.testing.assert_allclose([v for _, v in scalars["loss"]], [1.0, 0.5, 1 / 3], rtol=1e-6)
  assert scalars["eval/accuracy"] == [(1, 0.5), (2, 0.5), (3, 0.5)]


def test_resume_drops_records_after_start_step(tmp_path):
  logger = MetricsLogger(tmp_path, total_steps=10, progress=False)
  for step in range(1, 6):
    logger.write(step, {"loss": float(step)})
  logger.write(4, {"eval/accuracy": 0.1})
  logger._file.write('{"step": 6, "lo')  # pylint: disable=protected-access  # killed mid-line
  logger._file.flush()  # pylint: disable=protected-access
  logger._tb.flush()  # pylint: disable=protected-access
  # ... the run is killed; the last checkpoint was at step 3.
  with MetricsLogger(tmp_path, total_steps=10, progress=False, start_step=3) as logger:
    for step in (4, 5):
      logger.write(step, {"loss": 10.0 * step})
  records = read_metrics(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]
  for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
    _strict_json(line)
  assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")
  # TensorBoard: the new writer starts with a purge marker at step 4, so old steps >= 4 are hidden.
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  starts = [e.step for e in _events(tmp_path / "tensorboard")
            if e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [4]


def test_disabled_or_no_workdir_writes_nothing(tmp_path):
  with MetricsLogger(tmp_path / "off", total_steps=2, enabled=False) as logger:
    logger.write(1, {"loss": 1.0})
  assert not os.path.exists(tmp_path / "off")
  with MetricsLogger(None, total_steps=2, progress=False) as logger:
    logger.write(1, {"loss": 1.0})
  assert os.listdir(tmp_path) == []


def test_progress_bar_shows_loss_and_throughput(tmp_path):
  logger = MetricsLogger(tmp_path, total_steps=100, tensorboard=False, start_step=10)
  logger.write(11, {"loss": 0.123456, "perf/tokens_per_second": 12345.0, "perf/mfu": 0.41})
  bar = logger._bar  # pylint: disable=protected-access
  assert bar.n == 11 and bar.total == 100
  assert "loss=0.1235" in bar.postfix and "tok/s=12.3k" in bar.postfix
  assert "mfu=0.41" in bar.postfix
  logger.close()


def test_plot_metrics_tolerates_missing_keys(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with open(path, "w", encoding="utf-8") as f:
    for step in range(1, 101):
      f.write(json.dumps({"step": step, "loss": 1 / step, "kl": None}) + "\n")
      if step % 25 == 0:
        f.write(json.dumps({"step": step, "eval/accuracy": step / 100}) + "\n")
  png = tmp_path / "plots" / "loss.png"
  plot_metrics(path, png, keys=("loss", "kl", "absent"))
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  plot_metrics(tmp_path / "missing.jsonl", tmp_path / "empty.png")  # no data: still a PNG
  assert (tmp_path / "empty.png").stat().st_size > 0


def test_model_flops_per_token_hand_computed():
  # N = 1000, L = 2, D = 8, T = 16: 6 * 1000 + 12 * 2 * 8 * 16 = 6000 + 3072.
  kw = dict(num_params_non_embedding=1000, num_layers=2, hidden_size=8, seq_len=16)
  assert model_flops_per_token(**kw) == 9072.0
  assert model_flops_per_token(**kw, training=False) == 2000.0 + 1024.0


def test_peak_flops_and_mfu():
  assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert peak_flops("NVIDIA H100 PCIe") == 756e12
  assert peak_flops("NVIDIA H100 NVL") == 835e12  # not the SXM figure
  assert peak_flops("NVIDIA H200") == 989e12
  assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert peak_flops("TPU v4") == 275e12
  assert peak_flops("TPU v5 lite") == 197e12 and peak_flops("TPU v5e") == 197e12
  assert peak_flops("TPU v5") == 459e12 and peak_flops("TPU v5p") == 459e12
  assert peak_flops("TPU v6 lite") == 918e12
  assert peak_flops(jax.devices()[0]) is None  # CPU
  assert peak_flops("Some Future Chip") is None
  assert mfu(1000.0, 9072.0, None) is None
  assert math.isclose(mfu(1e4, 6e9, 989e12), 6e13 / 989e12)
  assert math.isclose(mfu(8e4, 6e9, 989e12, num_devices=8), 6e13 / 989e12)


def test_bfloat16_scalars_are_logged(tmp_path):
  """A bf16 jax / numpy scalar (an eval_fn's metric in a bfloat16 run) raised 'must be a scalar'."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  with MetricsLogger(tmp_path, total_steps=2, progress=False) as logger:
    logger.write(1, {"eval/loss": jnp.bfloat16(1.5), "kl": np.array(0.25, ml_dtypes.bfloat16),
                     "nan": jnp.array(jnp.nan, jnp.bfloat16)})
  assert read_metrics(tmp_path / "metrics.jsonl") == [
      {"step": 1, "eval/loss": 1.5, "kl": 0.25, "nan": None}]
  assert _scalars(tmp_path / "tensorboard")["eval/loss"] == [(1, 1.5)]


def test_write_refuses_non_integer_steps_and_non_dicts(tmp_path):
  with MetricsLogger(tmp_path, total_steps=2, progress=False, tensorboard=False) as logger:
    for step in (1.5, float("nan"), "3"):  # 1.5 was logged as step 1, "3" as 3
      with pytest.raises(TypeError, match="step must be an integer, got"):
        logger.write(step, {"loss": 1.0})
    with pytest.raises(TypeError, match="metrics must be a dict of scalars, got list"):
      logger.write(1, [("loss", 1.0)])
    logger.write(np.int64(1), {"loss": 1.0})
    logger.write(jnp.int32(2), {"loss": 2.0})
  assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_workdir_that_is_a_file(tmp_path):
  (tmp_path / "run").write_text("not a folder")
  with pytest.raises(NotADirectoryError, match="workdir .*run is a file, not a folder"):
    MetricsLogger(tmp_path / "run", total_steps=1, progress=False)


def test_damaged_bytes_skip_the_line_not_the_file(tmp_path):
  """A line with bytes that are not UTF-8 made read_metrics (and so a resume) raise."""
  path = tmp_path / "metrics.jsonl"
  path.write_bytes(b'{"step": 1, "loss": 1.0}\n\xff\xfe\x00{"st\n{"step": 2, "loss": 2.0}\n')
  assert read_metrics(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
  with MetricsLogger(tmp_path, total_steps=3, progress=False, tensorboard=False,
                     start_step=2) as logger:
    logger.write(3, {"loss": 3.0})
  assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_plot_metrics_one_key_string_and_atomic_write(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in range(1, 5)))
  png = tmp_path / "reward.png"
  plot_metrics(path, png, keys="reward")  # was read as the keys "r", "e", "w", ...
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  panels = []
  real = Figure.savefig

  def spy(fig, *args, **kwargs):
    panels.append([ax.get_ylabel() for ax in fig.axes])
    return real(fig, *args, **kwargs)

  monkeypatch.setattr(Figure, "savefig", spy)
  plot_metrics(path, png, keys="reward")
  assert panels == [["reward"]]
  good = png.read_bytes()

  def torn(fig, fname, **kwargs):  # a crash half-way through writing the PNG
    del fig, kwargs
    with open(fname, "wb") as f:
      f.write(b"\x89PNG")
    raise KeyboardInterrupt

  monkeypatch.setattr(Figure, "savefig", torn)
  with pytest.raises(KeyboardInterrupt):
    plot_metrics(path, png, keys="reward")
  assert png.read_bytes() == good  # the old plot is intact, and no temporary file is left
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "reward.png"]
