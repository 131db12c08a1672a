"""What a researcher sees during training: a JSON-lines log, TensorBoard, a progress bar, a plot.

``MetricsLogger.write(step, metrics)`` appends ``{"step": step, **metrics}`` to
``<workdir>/metrics.jsonl`` (flushed at once, so a crash loses nothing; NaN and inf become
``null``), writes each scalar to TensorBoard under ``<workdir>/tensorboard`` and updates a tqdm bar
(ETA, loss, tokens/s, MFU). On resume (``start_step > 0``) the lines and TensorBoard events the
interrupted run wrote after ``start_step`` are dropped, so every step appears once. ``close`` writes
``<workdir>/loss.png``.

Throughput helpers: ``model_flops_per_token`` (PaLM appendix B), ``peak_flops`` (datasheet dense
bf16 peaks) and ``mfu``.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import operator
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["MetricsLogger", "read_metrics", "plot_metrics", "model_flops_per_token", "peak_flops",
           "mfu"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "loss.png"


def _json_value(key: str, v) -> Any:
  """A JSON-safe scalar: numbers as int/float (non-finite -> None), str/bool/None as they are."""
  if v is None or isinstance(v, (str, bool)):
    return v
  if isinstance(v, numbers.Integral):
    return int(v)
  if isinstance(v, numbers.Real):
    v = float(v)
    return v if math.isfinite(v) else None
  a = np.asarray(v)  # numpy / jax scalars and one-element arrays
  if a.size == 1 and a.dtype.kind == "V" and a.dtype.names is None:
    try:  # bfloat16 / float8 (ml_dtypes) are kind "V" to numpy
      a = a.astype(np.float32)
    except (TypeError, ValueError):
      pass
  if a.size != 1 or a.dtype.kind not in "biuf":
    raise TypeError(f"metric {key!r} must be a scalar, got {type(v).__name__} of shape {a.shape}")
  return _json_value(key, a.reshape(()).item())


def read_metrics(path) -> list[dict]:
  """The records of a metrics.jsonl file, in order; blank or truncated (crash) lines are skipped."""
  records = []
  if not os.path.exists(path):
    return records
  # undecodable bytes (a damaged file) make that line unreadable JSON, skipped like a torn line
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def _truncate(path: str, last_step: int):
  """Rewrites ``path`` atomically, keeping the records with ``step <= last_step``."""
  kept = [r for r in read_metrics(path)
          if isinstance(r.get("step"), int) and r["step"] <= last_step]
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in kept:
      f.write(json.dumps(r, allow_nan=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


_LABELS = {"tokens_per_second": "tok/s"}


def _short(v) -> str:
  if isinstance(v, float) and abs(v) >= 1e4:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
      if abs(v) >= div:
        return f"{v / div:.3g}{suffix}"
  return f"{v:.4g}" if isinstance(v, float) else str(v)


class MetricsLogger:
  """Writes metrics.jsonl, TensorBoard events and a progress bar; see the module docstring.

  Args:
    workdir: where files go; None writes no files (the bar still shows).
    total_steps: the bar's total, for its ETA.
    enabled: False makes every method a no-op; pass ``jax.process_index() == 0``.
    tensorboard: write TensorBoard events (needs tensorboardX).
    progress: show a tqdm bar (on stderr).
    start_step: the step training resumes from; records after it are dropped first.
    progress_keys: metrics shown on the bar when present, labelled by their last ``/`` part
      (``tokens_per_second`` as ``tok/s``).
  """

  def __init__(self, workdir: str | None, *, total_steps: int, enabled: bool = True,
               tensorboard: bool = True, progress: bool = True, start_step: int = 0,
               progress_keys: Sequence[str] = ("loss", "perf/tokens_per_second", "perf/mfu")):
    self.enabled = enabled
    self.workdir = None if workdir is None else os.fspath(workdir)
    self.progress_keys = tuple(progress_keys)
    self._file = self._tb = self._bar = None
    if not enabled:
      return
    if self.workdir is not None:
      if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
        raise NotADirectoryError(f"MetricsLogger: workdir {self.workdir} is a file, not a "
                                 f"folder")
      os.makedirs(self.workdir, exist_ok=True)
      path = os.path.join(self.workdir, METRICS_FILE)
      if os.path.exists(path):
        _truncate(path, start_step)
      self._file = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        except ImportError:
          logging.warning("tensorboardX is not installed: no TensorBoard events")
        else:
          # purge_step makes TensorBoard discard events at steps > start_step from the old run.
          self._tb = SummaryWriter(os.path.join(self.workdir, TENSORBOARD_DIR), flush_secs=30,
                                   purge_step=start_step + 1 if start_step > 0 else None)
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, metrics: dict[str, Any]):
    """Logs one record of scalars (floats, ints, numpy/jax scalars; NaN/inf -> null in JSON)."""
    if not self.enabled:
      return
    try:  # ints, numpy / jax integer scalars; never a float silently truncated
      step = operator.index(step)
    except TypeError:
      raise TypeError(f"MetricsLogger.write: step must be an integer, got {step!r}") from None
    if not isinstance(metrics, Mapping):
      raise TypeError(f"MetricsLogger.write: metrics must be a dict of scalars, got "
                      f"{type(metrics).__name__}")
    record = {"step": step}
    record.update({k: _json_value(k, v) for k, v in metrics.items() if k != "step"})
    if self._file is not None:
      self._file.write(json.dumps(record, allow_nan=False) + "\n")
      self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):  # null (NaN) and strings are skipped
          self._tb.add_scalar(k, float(v), step)
    if self._bar is not None:
      if step > self._bar.n:
        self._bar.update(step - self._bar.n)
      shown = {_LABELS.get(k.rsplit("/", 1)[-1], k.rsplit("/", 1)[-1]): _short(record[k])
               for k in self.progress_keys if record.get(k) is not None}
      if shown:
        self._bar.set_postfix(shown, refresh=False)

  def close(self):
    """Closes the files and the bar, then plots ``<workdir>/loss.png``."""
    if not self.enabled:
      return
    if self._file is not None:
      self._file.close()
      self._file = None
      try:
        plot_metrics(os.path.join(self.workdir, METRICS_FILE),
                     os.path.join(self.workdir, PLOT_FILE))
      except Exception as e:  # pylint: disable=broad-exception-caught
        # A finished run must not fail over its plot (e.g. matplotlib missing).
        logging.warning("could not plot %s: %s", self.workdir, e)
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def plot_metrics(metrics_jsonl_path, png_path, keys: Sequence[str] = ("loss",)) -> None:
  """Plots each of ``keys`` and each ``eval/...`` metric against step, one panel each, to a PNG.

  Keys absent from the file are skipped (a file with none of them gives a "no data" figure).
  Uses matplotlib's object API with the Agg canvas: no display, no pyplot state.
  """
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  keys = (keys,) if isinstance(keys, str) else tuple(keys)  # "loss", not "l", "o", "s", "s"
  records = read_metrics(metrics_jsonl_path)
  present = {k for r in records for k, v in r.items() if isinstance(v, (int, float))
             and not isinstance(v, bool)}
  evals = sorted(k for k in present if k.startswith(("eval/", "eval_")) and k not in keys)
  panels = [k for k in keys if k in present] + evals[:max(0, 12 - len(keys))]
  fig = Figure(figsize=(7, 2.6 * max(1, len(panels))), layout="constrained")
  if not panels:
    ax = fig.subplots()
    ax.text(0.5, 0.5, f"no data for {', '.join(keys)} in {os.path.basename(metrics_jsonl_path)}",
            ha="center", va="center")
    ax.set_axis_off()
  else:
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, panels):
      pts = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), int)]
      steps, values = np.array([p[0] for p in pts]), np.array([p[1] for p in pts], float)
      sparse = len(pts) < 30
      ax.plot(steps, values, marker="o" if sparse else None, markersize=3, lw=1,
              alpha=1.0 if sparse else 0.35, label=key)
      if not sparse:  # a running mean over ~2% of the points shows the trend through the noise
        w = max(2, len(values) // 50)
        ax.plot(steps[w - 1:], np.convolve(values, np.ones(w) / w, mode="valid"), lw=1.5,
                color="C0", label=f"{key} (mean of {w})")
      ax.set_ylabel(key)
      ax.grid(alpha=0.3)
      ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step")
  png_path = os.fspath(png_path)
  os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
  tmp = f"{png_path}.tmp-{os.getpid()}"  # a crash never leaves half a PNG
  try:
    fig.savefig(tmp, dpi=100, format=os.path.splitext(png_path)[1][1:] or "png")
    os.replace(tmp, png_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def model_flops_per_token(*, num_params_non_embedding: int, num_layers: int, hidden_size: int,
                          seq_len: int, training: bool = True) -> float:
  """Model FLOPs per token of a decoder transformer (PaLM, Chowdhery et al. 2022, appendix B).

      training (forward + backward):  6 N + 12 L D T
      forward only:                   2 N +  4 L D T

  ``N`` is the number of non-embedding parameters (each costs a multiply-add forward, twice that
  backward; Kaplan et al. 2020); ``12 L D T`` is the attention score and value matmuls
  (``D`` = heads x head_dim, ``T`` = sequence length, no causal halving). Add ``vocab x hidden`` to
  ``N`` to count the output projection (the logits matmul), as PaLM does. Gradient
  recomputation (remat) is not counted: this is model FLOPs, the numerator of MFU.
  """
  flops = 6.0 * num_params_non_embedding + 12.0 * num_layers * hidden_size * seq_len
  return flops if training else flops / 3.0


# Datasheet dense bf16 peaks per chip (no sparsity), matched against ``device.device_kind``.
_PEAKS = (
    (r"h100.*pcie", 756e12),
    (r"h100.*nvl", 835e12),  # 1,671 TFLOP/s with 2:4 sparsity on the datasheet: half is dense
    (r"h100|h200", 989e12),  # H100 SXM, H200, GH200
    (r"a100", 312e12),
    (r"tpu v6", 918e12),  # v6e, Trillium
    (r"tpu v5 ?(lite|e)", 197e12),
    (r"tpu v5", 459e12),  # v5p reports itself as "TPU v5" or "TPU v5p"
    (r"tpu v4", 275e12),
    (r"tpu v3", 123e12),
)


def peak_flops(device) -> float | None:
  """Dense bf16 peak FLOP/s of one device from its datasheet, or None (CPU, unknown).

  Args:
    device: a ``jax.Device`` or its ``device_kind`` string (e.g. "NVIDIA H100 80GB HBM3", "TPU v4").
  """
  kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
  kind = kind.lower()
  for pattern, peak in _PEAKS:
    if re.search(pattern, kind):
      return peak
  return None


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None, *,
        num_devices: int = 1) -> float | None:
  """Model FLOPs utilisation: tokens/s x FLOPs/token / (peak x num_devices); None if peak unknown.

  ``peak`` is per device (``peak_flops``); ``tokens_per_second`` is over all ``num_devices``.
  """
  if not peak:
    return None
  return tokens_per_second * flops_per_token / (peak * num_devices)
