"""benchmarks/triage_summary.py, the verdicts of gpu_triage.sh, on hand-made JSON at either side of
each issue's targets (the benchmark smoke tests feed it the scripts' real JSON)."""

import json

from benchmarks import triage_summary


def _mosaic_doc(bits, vs_bf16, bw, *, check_err=1e-3, err=1e-3):
  row = dict(k=4096, n=4096, m=16, bits=bits, group=128 if bits == 4 else None, sweep=False,
             bf16_us=16.0, err=err)
  return {"mosaic_check": [dict(bits=bits, group=None, dtype="bfloat16", rel_err=check_err)],
          "mosaic": [dict(row, kernel="triton", us=14.0, vs_bf16=16.0 / 14.0, bw=0.4),
                     dict(row, kernel="mosaic", us=16.0 / vs_bf16, vs_bf16=vs_bf16, bw=bw)]}


def test_mosaic_verdict_applies_the_issue_targets_per_bit_width():
  for bits, vs_bf16, bw, met in ((4, 3.1, 0.85, True), (4, 2.9, 0.85, False), (4, 3.1, 0.75, False),
                                 (8, 1.8, 0.8, True), (8, 1.7, 0.9, False)):
    lines = triage_summary.mosaic_verdict(_mosaic_doc(bits, vs_bf16, bw)).splitlines()
    assert lines[0] == "issue 7: Mosaic check: 1 cases, 0 failing"
    assert ("MET by mosaic" in lines[1]) == met, lines[1]
    assert lines[1].endswith("fastest " + ("mosaic" if vs_bf16 > 16.0 / 14.0 else "triton"))


def test_mosaic_verdict_is_not_met_by_a_wrong_output():
  lines = triage_summary.mosaic_verdict(_mosaic_doc(4, 3.5, 0.9, err=0.5)).splitlines()
  assert "ERR 5.0e-01" in lines[1] and "not met" in lines[1]


def test_mosaic_verdict_counts_failing_checks_and_errors():
  doc = _mosaic_doc(4, 3.5, 0.9, check_err="ValueError: layout")
  doc["mosaic"][1] = {k: v for k, v in doc["mosaic"][1].items() if k not in ("us", "vs_bf16", "bw")}
  doc["mosaic"][1]["error"] = "RuntimeError: ptxas"
  lines = triage_summary.mosaic_verdict(doc).splitlines()
  assert lines[0].startswith("issue 7: Mosaic check: 1 cases, 1 failing (first: int4")
  assert "mosaic RuntimeError: ptxas" in lines[1] and "not met" in lines[1]


def test_decode_block_verdict_names_the_fastest_kernel_implementation():
  row = dict(config="smollm2-135m", batch=1, floor_us=80.0, xla_us=900.0, xla_over_floor=11.25,
             pallas_us=450.0, pallas_over_floor=5.63, xla_over_pallas=2.0,
             pallas_attention_us=600.0, pallas_attention_over_floor=7.5,
             xla_over_pallas_attention=1.5)
  ok = triage_summary.decode_block_verdict({"checks": [{"ok": True}], "rows": [row]})
  assert ok.endswith(": pallas FASTER (2.0x) (read floor 80.0 us)"), ok
  assert "pallas_attention 600.0 us (7.5x the floor, 1.5x)" in ok
  slower = triage_summary.decode_block_verdict({"checks": [{"ok": True}], "rows": [dict(
      row, xla_over_pallas=0.9, xla_over_pallas_attention=0.8)]})
  assert "no kernel faster" in slower
  failed = triage_summary.decode_block_verdict(
      {"checks": [{"ok": True}, {"ok": False, "error": "KernelShapeError: smem"}], "rows": [row]})
  assert failed.startswith("issue 9: fused layer check failed") and "1 of 2 failing" in failed
  untimed = triage_summary.decode_block_verdict({"checks": [{"ok": True}], "rows": [dict(
      config="smollm2-135m", batch=1, xla_us=900.0, pallas_error="RuntimeError: ptxas")]})
  assert "not timed both ways" in untimed and "ptxas" in untimed
  partial = triage_summary.decode_block_verdict({"checks": [{"ok": True}], "rows": [dict(
      row, pallas_attention_error="skipped: time limit")]})
  assert "pallas_attention skipped: time limit" in partial and "pallas FASTER" in partial
  # the persistent layer's check failed (a barrier timed out): named, the others still judged
  persistent = triage_summary.decode_block_verdict({
      "check_failed": ["pallas_persistent"],
      "checks": [{"ok": False, "ok_by_impl": {"pallas": True, "pallas_persistent": False},
                  "barrier_timeouts": {"pallas_persistent": 4}}],
      "rows": [row]})
  lines = persistent.splitlines()
  assert lines[0].startswith("issue 9: check FAILED for pallas_persistent (not timed; 1 of 1")
  assert lines[1].endswith(": pallas FASTER (2.0x) (read floor 80.0 us)"), lines
  faster = triage_summary.decode_block_verdict({"checks": [{"ok": True}], "rows": [dict(
      row, pallas_persistent_us=300.0, pallas_persistent_over_floor=3.75,
      xla_over_pallas_persistent=3.0)]})
  assert faster.endswith(": pallas_persistent FASTER (3.0x) (read floor 80.0 us)"), faster
  trace = dict(phase_1_us=1.5, phase_2_us=0.8, phase_3_us=1.1, phase_4_us=1.6, phase_5_us=2.0,
               barrier_1_us=0.9, barrier_2_us=0.9, barrier_3_us=1.0, barrier_4_us=0.8,
               launch_us=10.6, gap_us=2.5, programs=96, resolution_ns=32, barrier_timeouts=0)
  traced = triage_summary.decode_block_verdict({"checks": [{"ok": True}], "rows": [dict(
      row, pallas_persistent_us=300.0, xla_over_pallas_persistent=3.0,
      pallas_persistent_trace=trace)]}).splitlines()
  assert traced[1] == ("  persistent trace (median layer, us): phases 1.50/0.80/1.10/1.60/2.00, "
                       "barriers 0.90/0.90/1.00/0.80, launch 10.60, gap between layers 2.50; "
                       "P = 96, clock resolution 32 ns, timeouts 0")


def test_summarise_names_missing_and_unreadable_files(tmp_path):
  (tmp_path / "decode_block.json").write_text("{not json")
  with open(tmp_path / "quantized_matmul_mosaic.json", "w") as f:
    json.dump(_mosaic_doc(8, 2.0, 0.9), f)
  lines = triage_summary.summarise(str(tmp_path)).splitlines()
  assert lines[0].startswith("sampling.json missing")
  assert lines[1].startswith("decode_block.json unreadable (JSONDecodeError")
  assert "MET by mosaic" in lines[3]


def test_the_kernel_implementations_named_are_decode_blocks():
  from kernels.decode_block import KERNEL_IMPLS  # pylint: disable=import-outside-toplevel
  assert triage_summary.DECODE_BLOCK_KERNEL_IMPLS == KERNEL_IMPLS
