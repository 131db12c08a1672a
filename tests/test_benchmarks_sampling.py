"""benchmarks/sampling.py end to end on CPU: the kernel in interpret mode, tiny sizes, one table
row, one sweep point. What a GPU run executes once, so a broken argument, import or JSON field
fails here, not on the borrowed GPU."""

import json
import os
import re
import subprocess
import sys

from benchmarks import triage_summary
from tests.jax_cache import JAX_CACHE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sampling_benchmark_interpret(tmp_path):
  out = tmp_path / "sampling.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             JAX_COMPILATION_CACHE_DIR=JAX_CACHE_DIR,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  proc = subprocess.run(
      [sys.executable, "benchmarks/sampling.py", "--interpret", "--batch", "2", "--vocab", "3000",
       "--modes", "top_p", "--check-modes", "top_p", "--check-draws", "512", "--repeats", "1",
       "--check-configs", "row", "split_fast", "split_cdf",
       "--sweep", "--sweep-blocks", "512", "--sweep-warps", "4", "--sweep-programs", "8",
       "--out", str(out)],
      # ~4 min of interpret-mode compiles while the other test worker is busy (231 s in a
      # 2-worker CI run): a 300 s limit would make a slow machine fail it
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  doc = json.loads(out.read_text())
  assert doc["status"] == "complete" and doc["check_passed"] is True
  assert doc["versions"]["jax"] and doc["copy_bw_Bps"] > 0
  kinds = [(c["config"], c["kind"], c.get("dtype")) for c in doc["check"]]
  assert kinds == [(config, kind, dtype) for config in ("row", "split_fast", "split_cdf")
                   for kind, dtype in
                   (("frequency", None), ("support", "float32"), ("support", "bfloat16"))]
  (row,) = doc["table"]
  assert (row["mode"], row["batch"], row["vocab"], row["top_p"]) == ("top_p", 2, 3000, 0.9)
  for name in ("loop", "read", "sort", "bisect", "radix", "pallas", "split", "fast", "split_fast",
               "split_cdf", "kernel"):
    assert row[f"{name}_us"] > 0, row
  assert row["pallas_over_read"] == row["pallas_us"] / row["read_us"]
  # net of the timing loop's own cost, over the copy floor
  assert row["split_net_us"] == row["split_us"] - row["loop_us"]
  assert row["split_net_over_copy"] == row["split_net_us"] / row["copy_bound_us"]
  assert row["split_over_read"] == row["split_us"] / row["read_us"]
  assert row["mean_rounds"] >= 1
  # each setting exact, then with fast_math (split settings also with the cdf draw): the row
  # kernel, the default, the split grid
  (row, row_fm, exact_default, default, default_cdf, default_cdf4, default_cdf1, default_cdf2,
   split, split_fm, split_cdf, split_cdf4, split_cdf1, split_cdf2) = doc["sweep"]
  assert default_cdf["config"] == dict(default["config"], draw="cdf")
  assert split_cdf["config"] == dict(split["config"], draw="cdf", fast_math=True)
  for one, four, one_r2, two in ((default_cdf, default_cdf4, default_cdf1, default_cdf2),
                                 (split_cdf, split_cdf4, split_cdf1, split_cdf2)):
    assert four["config"] == dict(one["config"], candidates=4, split_rounds=2)
    assert one_r2["config"] == dict(one["config"], split_rounds=2)
    assert two["config"] == dict(one["config"], candidates=2, split_rounds=2)
  assert (row["config"]["block"], row["config"]["num_warps"]) == (1024, 16)
  assert not row["config"]["split"] and row["chunks"] == 1
  assert not row["config"]["fast_math"] and row_fm["config"] == dict(row["config"], fast_math=True)
  assert default["default"] and not exact_default["default"]
  assert default["config"]["split"] and default["config"]["fast_math"]
  assert split["config"]["split"] and split["config"]["block"] == 512 and split["chunks"] == 3
  assert split_fm["config"] == dict(split["config"], fast_math=True)
  assert all(s["us"] > 0 for s in doc["sweep"])
  # gpu_triage.sh's verdict reads these fields: the interpret row, relabelled as the B = 64 point
  # with times on either side of the two targets (<= 4x the read floor, >= 10x the sort)
  (point,) = doc["table"]
  assert triage_summary.sampling_verdict(doc).startswith("issue 8: no timed top-p row at B = 64")
  floor = point["copy_bound_us"]
  for over_floor, sort_over, met in ((3.9, 11, True), (4.1, 11, False), (3.9, 9, False)):
    relabelled = dict(doc, table=[dict(point, batch=64, default_us=over_floor * floor,
                                       sort_us=sort_over * over_floor * floor)])
    verdict = triage_summary.sampling_verdict(relabelled)
    assert verdict.endswith("MET" if met else "not met"), verdict
  assert triage_summary.sampling_verdict(
      dict(doc, check_passed=False, table=[dict(point, batch=64)])).startswith(
          "issue 8: check not passed")


def test_a_kernel_that_fails_still_leaves_the_xla_table(tmp_path):
  """Without --interpret on a CPU the Triton kernel cannot run, as if it failed to compile on the
  GPU: the check and the kernel columns record the error, the XLA samplers are still timed."""
  out = tmp_path / "sampling.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(
      [sys.executable, "benchmarks/sampling.py", "--batch", "2", "--vocab", "3000",
       "--modes", "top_p", "--check-modes", "top_p", "--check-draws", "64", "--repeats", "1",
       "--copy-mib", "4", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  doc = json.loads(out.read_text())
  assert doc["status"] == "complete" and doc["check_passed"] is False and doc["check_error"]
  (row,) = doc["table"]
  assert row["kernel_error"] and row["mean_rounds"] is None
  assert row["pallas_error"].startswith("skipped") and "kernel_us" not in row
  assert row["split_error"].startswith("skipped")
  for name in ("read", "sort", "bisect", "radix"):
    assert row[f"{name}_us"] > 0, row


def test_timing_loop_updates_the_logits_in_place():
  """The timing loop changes each buffer after the sampler read it, so XLA updates it in place:
  no copy of a whole logits buffer in the loop body (updating before the read made XLA copy every
  buffer on every iteration, which the first H100 table carried as ~42 us at B = 64). Checked on
  the CPU compiler's HLO with XLA readers (a column slice, a max) as the sampler."""
  import jax
  import jax.numpy as jnp
  from benchmarks.sampling import timing_loop
  bufs = [jnp.zeros((64, 4096), jnp.float32) for _ in range(2)]
  for fn in (lambda k, x: (x[:, 0],), lambda k, x: (jnp.max(x, axis=-1),)):
    hlo = jax.jit(timing_loop(fn), donate_argnums=(2, 3)).lower(
        jax.random.key(0), 3, *bufs).compile().as_text()
    copies = [line for line in hlo.splitlines() if "f32[64,4096]" in line and " copy(" in line]
    assert not copies, copies


def test_rows_and_lean_pick_the_points_and_columns(tmp_path):
  """--rows slices the table's points (table_points order) and --lean times only LEAN_VARIANTS,
  as the one-call device scripts use them (no kernel on a CPU: its columns record the error)."""
  from benchmarks.sampling import LEAN_VARIANTS, table_points  # pylint: disable=import-outside-toplevel
  out = tmp_path / "sampling.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(
      [sys.executable, "benchmarks/sampling.py", "--no-check", "--lean", "--rows", "1:3",
       "--batch", "2", "4", "--vocab", "3000", "--modes", "top_p", "top_k", "--repeats", "1",
       "--copy-mib", "4", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = json.loads(out.read_text())["table"]
  want = table_points(["top_p", "top_k"], [2, 4], [3000])[1:3]
  assert [(r["mode"], r["batch"], r["vocab"]) for r in rows] == want
  for row in rows:
    timed = {k[:-3] for k in row if k.endswith("_us") and not k.endswith(("_net_us", "bound_us"))}
    assert timed == {"loop", "read", "sort"}  # the lean XLA columns; no bisect, no radix
    # the kernel columns of the lean set fail on a CPU; "kernel" is the rounds probe's error
    assert {k[:-6] for k in row if k.endswith("_error")} == {
        "kernel", *(set(LEAN_VARIANTS) - {"loop", "read", "sort"})}
    assert "default_us" not in row  # no kernel timing, no default column


def test_timing_loops_set_the_changed_entry_instead_of_adding_to_it():
  """The timing loops change one entry of the carried buffer per iteration. An add reads the old
  entry inside the update's fusion, which XLA emits as a pass over the whole buffer (read + write
  of every entry, measured as 36 us at B = 64, V = 152k on an H200 and in every gross time); a set
  stays an in-place update of one entry."""
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, ROOT)
  from benchmarks import quantized_matmul, sampling  # pylint: disable=import-outside-toplevel
  buf = jnp.zeros((4, 64), jnp.float32)
  for run, args in ((sampling.timing_loop(lambda k, x: (x[:, 0],)), (jax.random.key(0), 2, buf)),
                    (quantized_matmul.looped(lambda x, w: [x @ w], 2), (buf, jnp.ones((64, 8))))):
    ops = re.findall(r"= (scatter[-a-z]*)", str(jax.make_jaxpr(run)(*args)))
    assert ops and set(ops) == {"scatter"}, ops
