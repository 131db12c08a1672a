"""The benchmark scripts end to end on CPU with the tiny preset (subprocesses, one device).

They are what a GPU run executes once (``benchmarks/generate.py``, ``benchmarks/train_step.py``,
``benchmarks/grpo_step.py``), so a broken argument, import or JSON field must fail here, not on
the borrowed GPU.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import common, triage_summary
from tests.jax_cache import JAX_CACHE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, timeout=300):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             TRANSFORMERS_OFFLINE="1",
             JAX_COMPILATION_CACHE_DIR=JAX_CACHE_DIR,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  proc = subprocess.run([sys.executable, os.path.join("benchmarks", script), *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def _tiny_cfg():
  return common.model_config("tiny", param_dtype="float32", dtype="float32")


def test_train_step_tiny(tmp_path):
  out = tmp_path / "train_step.json"
  stdout = _run("train_step.py", "--tiny", "--attention", "xla", "cudnn", "--breakdown", "--out",
                str(out))
  doc = json.loads(out.read_text())
  # cuDNN attention cannot be built here (float32 on CPU): both its rows say why, in one line
  cudnn = [j for j in doc["jobs"] if j["attention"] == "cudnn"]
  assert [j["job"] for j in cudnn] == ["sft", "dpo"]
  assert all("attention_impl='cudnn' needs dtype bfloat16" in j["error"] for j in cudnn)
  assert doc["status"] == "failed jobs ['sft/cudnn', 'dpo/cudnn']"
  doc["jobs"] = [j for j in doc["jobs"] if j["attention"] == "xla"]
  assert {j["attention_used"] for j in doc["jobs"]} == {"xla"}
  assert doc["device_count"] == 1 and doc["mesh"]["data"] == 1
  assert doc["model"]["random_weights"] and doc["versions"]["jax"] and doc["date"]

  # 6 N + 12 L D T by hand: tiny is tied (the output projection is the embedding, counted once)
  cfg = _tiny_cfg()
  d, f, L, V, T = 64, 128, 2, 512, 64
  per_layer = d * 32 * (4 + 2 * 2) + 4 * 32 * d + 3 * d * f + 2 * d  # head_dim 32
  n = L * per_layer + V * d + d
  assert cfg.num_params() == n
  assert doc["flops_per_token"] == 6 * n + 12 * L * d * T
  assert doc["flops_per_token_causal"] == 6 * n + 6 * L * d * T

  jobs = {j["job"]: j for j in doc["jobs"]}
  assert set(jobs) == {"sft", "dpo"}
  for job in jobs.values():
    # --breakdown: every part timed; the update and "other" are differences of the timed parts
    parts = job["breakdown"]
    assert all(parts[k] > 0 for k in ("forward_s", "forward_backward_s", "attention_s",
                                      "matmul_ideal_s")), parts
    assert parts["update_s"] == pytest.approx(job["step_s"] - parts["forward_backward_s"],
                                              abs=2e-4)
    assert parts["other_s"] == pytest.approx(
        parts["forward_backward_s"] - parts["attention_s"] - parts["matmul_ideal_s"], abs=1e-6)
    assert parts["matmul_ideal_s"] == pytest.approx(
        (doc["flops_per_token"] - 12 * L * d * T) * 4 * T / doc["peak_flops_measured"], rel=1e-3)
    assert job["sequences_per_step"] == 4 and job["tokens_per_step"] == 4 * T
    assert job["timed_steps"] == 2 and job["finite"] == 1.0
    assert job["tokens_per_s"] == pytest.approx(4 * T / job["step_s"], rel=0.02)
    assert job["mfu_measured"] == pytest.approx(
        job["tokens_per_s"] * doc["flops_per_token"] / doc["peak_flops_measured"], abs=1e-3)
    assert job["mfu_datasheet"] is None  # no datasheet peak for a CPU
    assert job["loss_last"] < job["loss_first"]  # three AdamW updates on the same batch
  # sft: token mean of -log p at random weights is about log V; dpo: -log sigmoid(...) > 0
  assert jobs["sft"]["loss_first"] == pytest.approx(6.24, abs=0.1)
  assert 0 < jobs["dpo"]["loss_first"]
  assert "[sft] 2 steps in" in stdout and "[dpo] 2 steps in" in stdout


def test_train_step_halves_a_batch_that_does_not_fit(tmp_path):
  """A step predicted to need more than the device has is retried at half the batch, and the
  next job starts from the batch that fitted (no second failed compile)."""
  out = tmp_path / "train_step.json"
  _run("train_step.py", "--tiny", "--memory-limit-gib", "0.005", "--out", str(out))
  doc = json.loads(out.read_text())  # tiny at 4 rows needs ~6.3 MiB, at 2 rows ~3.8 MiB
  assert [(f["job"], f["sequences_per_step"]) for f in doc["failures"]] == [("sft", 4)]
  assert "RESOURCE_EXHAUSTED" in doc["failures"][0]["error"]
  assert [(j["job"], j["sequences_per_step"]) for j in doc["jobs"]] == [("sft", 2), ("dpo", 2)]
  assert all(j["total_bytes"] <= 0.005 * 2**30 for j in doc["jobs"])


def test_generate_tiny_with_transformers(tmp_path):
  out = tmp_path / "generate.json"
  stdout = _run("generate.py", "--config", "tiny", "--batch", "2", "--prompt-len", "4",
                "--new-tokens", "4", "--repeats", "1", "--copy-mib", "8", "--launches",
                "--out", str(out))
  doc = json.loads(out.read_text())
  assert doc["status"] == "complete" and doc["settings"]["dtype"] == "float32"
  # top-p 0.9: the sampler's 32-pass bisection is a loop nested in every decode step
  launches = doc["rows"][0]["postrl_launches_per_step"]
  assert [32, 0] < max(launches["nested_loops"]) and launches["unknown_trip_counts"] == 0
  assert launches["launches"] > 32 and sum(launches["by_op"].values()) == launches["launches"]
  assert doc["transformers"]["ready"] and doc["transformers"]["versions"]["transformers"]
  cfg = _tiny_cfg()
  bandwidth = max(doc["copy_bandwidth_bytes_per_s"], doc["matvec_bandwidth_bytes_per_s"])
  assert [r["batch"] for r in doc["rows"]] == [2]
  for row in doc["rows"]:
    b = row["batch"]
    kv = 2 * cfg.num_hidden_layers * b * (4 + 4) * cfg.num_key_value_heads * cfg.dim_per_head
    assert row["bytes_per_decode_step"] == 4 * (cfg.num_params() + kv)
    assert row["bandwidth_bound_tokens_per_s"] == pytest.approx(
        bandwidth / row["bytes_per_decode_step"] * b, rel=1e-3)
    assert row["postrl_tokens_per_s"] > 0 and row["transformers_tokens_per_s"] > 0
    assert row["ratio"] == pytest.approx(
        row["postrl_tokens_per_s"] / row["transformers_tokens_per_s"], abs=0.01)
  assert "batch 2:" in stdout and "transformers tok/s" in stdout


_HLO = """HloModule m

%inner_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %a = f32[4]{0} get-tuple-element(%p), index=1
  %f = f32[4]{0} fusion(%a), kind=kLoop, calls=%fc
  %g = f32[4]{0} fusion(%f), kind=kLoop, calls=%fc
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %g)
}

%inner_cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  ROOT %c = pred[] fusion(%p), kind=kLoop, calls=%cc
}

%outer_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %x = f32[4]{0} custom-call(%p), custom_call_target="__cublas$gemm"
  %w = (s32[], f32[4]{0}) while(%p), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"32"}}
  %y = f32[4]{0} copy(%x)
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %y)
}

%outer_cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  ROOT %c = pred[] fusion(%p), kind=kLoop, calls=%cc
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %pre = f32[4]{0} fusion(%a), kind=kLoop, calls=%fc
  %w = (s32[], f32[4]{0}) while(%t0), condition=%outer_cond, body=%outer_body
  ROOT %r = f32[4]{0} get-tuple-element(%w), index=1
}
"""


def test_loop_launches_counts_one_step_of_the_main_loop():
  got = common.loop_launches(_HLO)
  # outer body: gemm + copy + 32 x 2 fusions of the inner loop (known trip count: its condition
  # is not run); the outer loop's trip count is unknown, so its condition counts once. The
  # fusion before the loop is not part of a step.
  assert got["launches"] == 1 + 1 + 32 * 2 + 1
  assert got["by_op"] == {"fusion": 65, "custom-call:__cublas$gemm": 1, "copy": 1}
  assert got["nested_loops"] == [(32, 2)] and got["unknown_trip_counts"] == 0
  assert common.loop_launches("ENTRY %main (a: f32[]) -> f32[] {\n}\n")["launches"] is None


_HLO_DETAILED = """HloModule m, is_scheduled=true

FileNames
1 "/src/model.py"

FunctionNames
1 "forward"
2 "Block.__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=1 function_name_id=2 line=42 end_line=42 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}

%fused_norm (p0: f32[1,8], p1: f32[8]) -> f32[1,8] {
  %p0 = f32[1,8]{1,0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  %b = f32[1,8]{1,0} broadcast(%p1), dimensions={1}
  %m = f32[1,8]{1,0} multiply(%p0, %b)
  ROOT %r = f32[1,8]{1,0} multiply(%m, %m)
}

%big (p: f32[1,8]) -> f32[1,8] {
  %p = f32[1,8]{1,0} parameter(0)
  %f1 = f32[1,8]{1,0} fusion(%p), kind=kLoop, calls=%fused_norm
  ROOT %f2 = f32[1,8]{1,0} fusion(%f1), kind=kLoop, calls=%fused_norm
}

%small (p: f32[1,8]) -> f32[1,8] {
  %p = f32[1,8]{1,0} parameter(0)
  ROOT %c1 = f32[1,8]{1,0} copy(%p)
}

%command_buffer (p: f32[1,8]) -> f32[1,8] {
  %p = f32[1,8]{1,0} parameter(0)
  ROOT %g = (f32[1,8]{1,0}, s8[16]{0}) custom-call(%p), custom_call_target="__cublas$gemm"
}

%body (p: (s32[], f32[1,8])) -> (s32[], f32[1,8]) {
  %p = (s32[], f32[1,8]{1,0}) parameter(0)
  %x = f32[1,8]{1,0} get-tuple-element(%p), index=1
  %n = f32[1,8]{1,0} fusion(%x, %x), kind=kInput, calls=%fused_norm, metadata={op_name="jit(f)/while/body/mul" stack_frame_id=2}, backend_config={"fusion_backend_config":{"kind":"__triton"}}
  %k = f32[1,8]{1,0} call(%n), to_apply=%command_buffer
  %s = f32[1,8]{1,0} conditional(%i, %k, %k), branch_computations={%small, %big}
  ROOT %t = (s32[], f32[1,8]{1,0}) tuple(%i, %s)
}

%cond (p: (s32[], f32[1,8])) -> pred[] {
  %p = (s32[], f32[1,8]{1,0}) parameter(0)
  ROOT %lt = pred[] fusion(%p), kind=kLoop, calls=%fused_norm, metadata={op_name="jit(f)/while/lt"}
}

ENTRY %main (a: f32[1,8]) -> f32[1,8] {
  %a = f32[1,8]{1,0} parameter(0)
  %loop = (s32[], f32[1,8]{1,0}) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[1,8]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_loop_launch_list_one_entry_per_launched_instruction():
  entries = common.loop_launch_list(_HLO_DETAILED)
  got = [(e["count"], e["kind"], e["name"], e["shape"], e["where"]) for e in entries]
  # a call is replaced by its callee's launches; a conditional lists every branch, counting only
  # the largest (%big: 2 fusions, not %small's copy); the loop's trip count is unknown, so its
  # condition runs every step
  assert got == [
      (1, "fusion:kInput:__triton", "n", "f32[1,8]", ""),
      (1, "custom-call:__cublas$gemm", "g", "(f32[1,8], s8[16])", "k -> command_buffer"),
      (0, "copy", "c1", "f32[1,8]", "s branch 0 (not counted)"),
      (1, "fusion:kLoop", "f1", "f32[1,8]", "s branch 1"),
      (1, "fusion:kLoop", "f2", "f32[1,8]", "s branch 1"),
      (1, "fusion:kLoop", "lt", "pred[]", "loop condition")]
  first = entries[0]
  assert first["fused"] == "multiply x2" and first["op_name"] == "jit(f)/while/body/mul"
  # frame 2 (Block.__call__, line 42) is called from frame 1 (forward, line 10)
  assert first["source"] == "model.py:42 Block.__call__ < model.py:10 forward"
  counted = common.loop_launches(_HLO_DETAILED)
  assert counted["launches"] == sum(e["count"] for e in entries) == 5
  assert counted["by_op"] == {"fusion": 4, "custom-call:__cublas$gemm": 1}  # no uncounted copy
  text = common.format_launch_list(entries, "title").splitlines()
  assert text[0] == "# title" and "5 launches per iteration from 6 instructions" in text[1]
  assert "# op_name prefix left out: jit(f)/while/" in text
  rows = [line.split(" | ") for line in text if not line.startswith("#")]
  assert [int(r[0]) for r in rows] == [e["count"] for e in entries]
  assert rows[0][1].strip() == "fusion:kInput:__triton" and rows[0][-1] == "body/mul"
  assert common.loop_launch_list("ENTRY %main (a: f32[]) -> f32[] {\n}\n") == []


def test_dump_hlo_compresses_large_text(tmp_path):
  import gzip  # pylint: disable=import-outside-toplevel
  from benchmarks import generate  # pylint: disable=import-outside-toplevel
  small = generate.dump_hlo(_HLO_DETAILED, str(tmp_path), "m_b1", "t")
  assert small["hlo"].endswith("m_b1.hlo.txt") and small["instructions"] == 6
  assert open(small["hlo"]).read() == _HLO_DETAILED and small["launches"] == 5
  packed = generate.dump_hlo(_HLO_DETAILED, str(tmp_path / "z"), "m_b1", "t", gzip_bytes=0)
  assert packed["hlo"].endswith("m_b1.hlo.txt.gz")
  assert gzip.open(packed["hlo"]).read().decode() == _HLO_DETAILED


def test_generate_dump_hlo_tiny(tmp_path):
  """--dump-hlo: the HLO text --launches reads and one line per launched instruction of the decode
  step; a line's count is its launches per step (a nested loop's trip count: the sampler's random
  bits and top-p bisection loops), so the lines' counts add up to the step's launch count."""
  out, dump = tmp_path / "generate.json", tmp_path / "hlo"
  stdout = _run("generate.py", "--config", "tiny", "--batch", "1", "--prompt-len", "4",
                "--new-tokens", "4", "--repeats", "1", "--copy-mib", "8", "--no-baseline",
                "--dump-hlo", str(dump), "--out", str(out))
  (row,) = json.loads(out.read_text())["rows"]
  files = row["postrl_hlo_files"]
  assert files["hlo"] == str(dump / "tiny_b1.hlo.txt")  # 0.3 MB: not compressed
  assert files["fusions"] == str(dump / "tiny_b1.fusions.txt")
  assert sorted(p.name for p in dump.iterdir()) == ["tiny_b1.fusions.txt", "tiny_b1.hlo.txt"]
  hlo = (dump / "tiny_b1.hlo.txt").read_text()
  launches = row["postrl_launches_per_step"]  # --dump-hlo implies --launches
  assert common.loop_launches(hlo)["launches"] == launches["launches"] > 32
  lines = (dump / "tiny_b1.fusions.txt").read_text().splitlines()
  assert lines[0].startswith("# tiny_b1: tiny, batch 1, prompt 4, 4 new tokens, top-p 0.9")
  rows = [line.split(" | ") for line in lines if not line.startswith("#")]
  assert len(rows) == files["instructions"] == len(common.loop_launch_list(hlo))
  counts = [int(r[0]) for r in rows]
  assert sum(counts) == files["launches"] == launches["launches"]
  assert len(rows) < launches["launches"] and 32 in counts  # the bisection's body, 32 times
  kinds = {}
  for r, n in zip(rows, counts):
    kinds[r[1].strip().split(":")[0]] = kinds.get(r[1].strip().split(":")[0], 0) + n
  assert kinds == launches["by_op"] and kinds["fusion"] > 0
  assert any(r[1].strip() == "fusion:kLoop" and r[5] != "-" for r in rows)  # fused opcodes
  assert any("transformer.py" in r[6] for r in rows)  # the model's source lines
  assert "wrote" in stdout and "tiny_b1.fusions.txt" in stdout


def test_generate_time_limit_still_writes_json(tmp_path):
  out = tmp_path / "generate.json"
  stdout = _run("generate.py", "--config", "tiny", "--batch", "1", "2", "--no-baseline",
                "--copy-mib", "8", "--time-limit", "0", "--out", str(out))
  doc = json.loads(out.read_text())
  assert doc["rows"] == [] and doc["status"] == "time limit: skipped batch sizes [1, 2]"
  assert "wrote" in stdout


def test_presets_match_published_shapes():
  llama = common.model_config("llama-1b", param_dtype="bfloat16", dtype="bfloat16")
  assert llama.num_params() == 1_235_814_400  # Llama-3.2-1B (tied embeddings)
  assert dict(llama.rope_scaling)["rope_type"] == "llama3"
  smol = common.model_config("smollm2-135m", param_dtype="float32", dtype="float32")
  assert smol.num_params() == 134_515_008  # SmolLM2-135M


def test_gpu_sh_runs_every_stage(tmp_path):
  """The one GPU command, with tiny sizes appended (later arguments win), writes all results."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", OUT=str(tmp_path), BUDGET="600",
             GRPO_LIMIT="120", PYTHON=sys.executable,
             TRAIN_ARGS="--tiny --jobs sft --attention xla",
             GEN_ARGS="--config tiny --batch 2 --prompt-len 4 --new-tokens 4 --repeats 1 "
                      "--no-baseline --copy-mib 8",
             GRPO_ARGS="--tiny --no-trl --steps 1",
             JAX_COMPILATION_CACHE_DIR=JAX_CACHE_DIR)
  env.pop("STAGES", None)
  proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh")], env=env,
                        capture_output=True, text=True, timeout=420)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  train = json.loads((tmp_path / "train_step_llama-1b.json").read_text())
  assert train["status"] == "complete" and [j["job"] for j in train["jobs"]] == ["sft"]
  assert train["jobs"][0]["tokens_per_s"] > 0
  for name in ("generate_llama-1b", "generate_smollm2-135m"):
    doc = json.loads((tmp_path / f"{name}.json").read_text())
    assert doc["status"] == "complete" and doc["rows"][0]["postrl_tokens_per_s"] > 0
    assert (tmp_path / f"{name}.log").read_text().count("wrote") == 1
  grpo = json.loads((tmp_path / "grpo_step_smollm2-135m.json").read_text())
  assert grpo["status"] == "complete" and grpo["settings"]["time_limit"] <= 120
  assert grpo["model"]["name"] == "tiny" and grpo["postrl"]["median"]["total_s"] > 0
  assert "gpu.sh done" in proc.stdout


def test_gpu_sh_runs_only_the_chosen_stages(tmp_path):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", OUT=str(tmp_path), STAGES="grpo",
             PYTHON=sys.executable, GRPO_ARGS="--tiny --no-trl --steps 1",
             JAX_COMPILATION_CACHE_DIR=JAX_CACHE_DIR)
  env.pop("BUDGET", None)
  env.pop("GRPO_LIMIT", None)
  proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh")], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  written = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json")
  assert written == ["grpo_step_smollm2-135m.json"]
  doc = json.loads((tmp_path / "grpo_step_smollm2-135m.json").read_text())
  # the budget is GRPO_LIMIT alone (240 s), less the 15 s the script keeps for itself
  assert 200 <= doc["settings"]["time_limit"] <= 225 and doc["status"] == "complete"


# ----------------------------------------------------------------------------- grpo_step.py


def _check_postrl_steps(doc, *, steps, new_tokens, old, ref):
  """The per-step records of benchmarks/grpo_step.py: one warm-up then ``steps`` timed steps,
  phases adding up, EOS ignored, and log-prob time where (and only where) it is due."""
  rows = doc["postrl"]["steps"]
  assert [r["step"] for r in rows] == list(range(1 + steps))
  assert [r["warmup"] for r in rows] == [True] + [False] * steps
  for r in rows:
    assert r["completion_tokens_mean"] == new_tokens  # every completion runs to the budget
    assert r["reward_mean"] == 0.0 and r["finite"] == 1.0  # no \boxed{} in random words
    # sampling and log-probs are timed inside the rollout, which is timed inside the step
    assert r["generation_s"] > 0 and r["update_s"] > 0 and r["other_s"] >= -1e-3
    assert (r["logprobs_old_s"] > 0) == old and (r["logprobs_ref_s"] > 0) == ref
  timed = rows[1:]
  median = doc["postrl"]["median"]
  assert median["timed_steps"] == steps
  for phase in ("generation", "logprobs", "update", "total"):
    values = sorted(r[f"{phase}_s"] for r in timed)
    assert median[f"{phase}_s"] == pytest.approx(
        (values[(steps - 1) // 2] + values[steps // 2]) / 2, abs=2e-4)


def test_grpo_step_tiny_postrl_only(tmp_path):
  out = tmp_path / "grpo.json"
  stdout = _run("grpo_step.py", "--tiny", "--no-trl", "--steps", "2", "--out", str(out))
  doc = json.loads(out.read_text())
  assert doc["status"] == "complete" and doc["trl"] == {"skipped": "--no-trl"}
  assert doc["ratio_trl_over_postrl"] is None and doc["versions"]["jax"] and doc["date"]
  assert doc["workload"]["completions_per_step"] == 64 and doc["workload"]["kl_coef"] == 0.04
  assert doc["workload"]["attention_used"] == "xla"  # CPU: "auto" keeps the einsum
  assert doc["postrl"]["prompt_tokens"] == 16  # the 16-word prompts are 16 tokens
  config = doc["postrl"]["config"]
  assert config["rollout"]["group_size"] == 8 and config["loss"]["kl_coef"] == 0.04
  assert config["rewards"] == {"boxed_format": 1.0} and config["accum_steps"] == 1
  _check_postrl_steps(doc, steps=2, new_tokens=16, old=False, ref=True)
  assert "[postrl]" in stdout and "TRL / postrl" in stdout


def test_grpo_step_old_logprobs_with_several_updates(tmp_path):
  """μ = 2 updates per rollout: old-policy log-probs are computed; kl 0: no reference ones."""
  out = tmp_path / "grpo.json"
  _run("grpo_step.py", "--tiny", "--no-trl", "--steps", "1", "--updates-per-rollout", "2",
       "--kl-coef", "0", "--out", str(out))
  doc = json.loads(out.read_text())
  assert doc["postrl"]["config"]["rollout"]["epochs"] == 2 and doc["workload"]["old_logprobs"]
  _check_postrl_steps(doc, steps=1, new_tokens=16, old=True, ref=False)


def test_grpo_step_time_limit_keeps_one_timed_step(tmp_path):
  out = tmp_path / "grpo.json"
  stdout = _run("grpo_step.py", "--tiny", "--no-trl", "--steps", "3", "--time-limit", "0",
                "--out", str(out))
  doc = json.loads(out.read_text())
  assert doc["status"] == "partial: postrl 1, TRL - of 3 timed steps"
  assert [r["step"] for r in doc["postrl"]["steps"]] == [0, 1]  # warm-up + one timed step
  assert doc["postrl"]["median"]["timed_steps"] == 1 and "time limit: 1 of 3" in stdout


def test_grpo_step_tiny_with_trl(tmp_path):
  """Both frameworks (runs where TRL is installed: the GPU image gets it from .whl/)."""
  pytest.importorskip("trl")
  out = tmp_path / "grpo.json"
  _run("grpo_step.py", "--tiny", "--steps", "1", "--out", str(out), timeout=600)
  doc = json.loads(out.read_text())
  assert doc["status"] == "complete", doc["status"]
  assert doc["trl"]["ready"] and doc["trl"]["versions"]["trl"]
  settings = doc["trl"]["settings"]
  assert settings["num_generations"] == 8 and settings["per_device_train_batch_size"] == 64
  assert settings["generation_config"]["min_new_tokens"] == 16 and settings["ref_model"]
  rows = doc["trl"]["steps"]
  assert [r["step"] for r in rows] == [0, 1]
  for r in rows:
    assert r["completion_tokens"] == [16, 16] and r["prompt_tokens"] == [16]  # same workload
    assert r["logprobs_ref_s"] > 0 and r["logprobs_old_s"] == 0
    assert r["generation_s"] > 0 and r["update_s"] > 0 and r["other_s"] >= -1e-3
  ratio = doc["ratio_trl_over_postrl"]
  assert ratio["total"] == pytest.approx(
      doc["trl"]["median"]["total_s"] / doc["postrl"]["median"]["total_s"], abs=0.01)


def test_word_tokenizer_and_prompts():
  from benchmarks import grpo_step  # pylint: disable=import-outside-toplevel
  tok = grpo_step.word_tokenizer(40)
  assert tok.vocab_size == 40 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  prompts = grpo_step.prompt_texts(3, 5, 40, seed=1)
  ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in prompts]
  assert [len(i) for i in ids] == [5, 5, 5] and min(min(i) for i in ids) >= 3
  assert [tok.decode(i) for i in ids] == prompts  # words <-> ids, no special tokens added
  assert tok.encode("t7 t39 </s>") == [7, 39, 2]


def test_phase_records_medians_and_ratios():
  from benchmarks import grpo_step  # pylint: disable=import-outside-toplevel
  timer = grpo_step.PhaseTimer()
  slow = timer.wrap("generation", lambda x: x + 1)
  picked = timer.wrap(lambda p: None if p == "loss" else f"logprobs_{p}", lambda p: p)
  assert slow(1) == 2 and picked("ref") == "ref" and picked("loss") == "loss"
  assert set(timer.pop()) == {"generation", "logprobs_ref"} and timer.pop() == {}
  phases = dict(generation=2.0, logprobs_old=0.25, logprobs_ref=0.5)
  row = grpo_step.step_row(1, rollout_s=3.0, update_s=1.0, phases=phases)
  assert (row["logprobs_s"], row["other_s"], row["total_s"], row["warmup"]) == (0.75, 0.25, 4.0,
                                                                                False)
  rows = [grpo_step.step_row(0, rollout_s=30.0, update_s=9.0, phases={})] + [
      grpo_step.step_row(i, rollout_s=float(i), update_s=1.0, phases={"generation": i / 2})
      for i in (1, 2, 6)]
  med = grpo_step.medians(rows)  # the warm-up step is left out
  assert med["total_s"] == 3.0 and med["generation_s"] == 1.0 and med["timed_steps"] == 3
  ratio = grpo_step.ratios(med, dict(med, total_s=30.0, generation_s=4.0, logprobs_s=1.0))
  assert ratio["total"] == 10.0 and ratio["generation"] == 4.0 and ratio["logprobs"] is None
  assert grpo_step.medians(rows[:1]) is None and grpo_step.ratios(med, None) is None


def test_quantized_matmul_benchmark_interpret(tmp_path):
  """The GPU benchmark's whole path (weights, XLA baselines, kernel check, JSON) on CPU."""
  out = tmp_path / "qmm.json"
  _run("quantized_matmul.py", "--interpret", "--m", "1", "--shapes", "256x128", "--repeats", "1",
       "--no-check", "--materialise-from", "1", "--out", str(out))
  result = json.loads(out.read_text())
  (row,) = result["table"]
  assert (row["k"], row["n"], row["m"]) == (256, 128, 1)
  for name in ("int8", "int4"):
    assert row[f"pallas_{name}_us"] > 0 and row[f"xla_{name}_us"] > 0
    assert row[f"err_{name}"] < 1e-2  # the kernel agrees with the XLA path it is timed against
    # the dequantise-once baseline computes the same product (bf16 rounding of W and y only)
    assert row[f"mat_{name}_us"] > 0 and row[f"err_mat_{name}"] < 1e-2


def test_quantized_matmul_benchmark_checks_and_times_the_mosaic_kernel(tmp_path):
  """--mosaic: the Mosaic GPU kernel checked against the reference, timed beside bf16 and the
  default Triton kernel, then its tiling sweep at one shape (interpret mode); no table."""
  out = tmp_path / "qmm_mosaic.json"
  _run("quantized_matmul.py", "--interpret", "--mosaic", "--mosaic-m", "1", "--mosaic-sweep-shape",
       "256x128", "--mosaic-sweep-m", "3", "--skip-table", "--no-check", "--shapes", "256x128",
       "--repeats", "1", "--out", str(out))
  result = json.loads(out.read_text())
  assert "table" not in result
  assert {(c["bits"], c["group"], c["zeros"]) for c in result["mosaic_check"]} == {
      (8, None, True), (4, 64, True)}
  assert all(c["rel_err"] < 1e-2 for c in result["mosaic_check"]), result["mosaic_check"]
  rows = result["mosaic"]
  # the Triton dot kernel on the repacked codes too (int8 at M = 1; int4 runs the fma kernel)
  assert {(r["bits"], r["kernel"]) for r in rows if not r["sweep"]} == {
      (b, k) for b in (8, 4) for k in ("triton", "mosaic")} | {(8, "triton_nk")}
  swept = [r for r in rows if r["sweep"]]
  assert {r["m"] for r in swept} == {3} and {r["kernel"] for r in swept} == {"mosaic"}
  assert len({(r["bits"], tuple(sorted(r["cfg"].items()))) for r in swept}) == len(swept) > 4
  for r in rows:
    assert "error" not in r and r["us"] > 0 and r["err"] < 1e-2 and r["bf16_us"] > 0, r
  # gpu_triage.sh's summary reads this JSON: the check's count, then one line per timed point
  lines = triage_summary.mosaic_verdict(result).splitlines()
  assert lines[0] == f"issue 7: Mosaic check: {len(result['mosaic_check'])} cases, 0 failing"
  assert [line.split(" (bf16")[0] for line in lines[1:]] == [
      "issue 7: 256 x 128 M = 1 int4", "issue 7: 256 x 128 M = 1 int8"]
  assert "triton_nk" in lines[2] and "mosaic" in lines[1]


def test_quantized_matmul_benchmark_times_every_kernel_variant(tmp_path):
  """--variants: the three kernels and both unpacks, beside bf16, with their errors; no table.
  --check-kernels fma --check-unpacks magic: the odd-shape check of the GEMV kernel with the
  float32 exponent-trick unpack (M = 1 and 3 only)."""
  out = tmp_path / "qmm_variants.json"
  _run("quantized_matmul.py", "--interpret", "--variants", "--variants-m", "1", "--skip-table",
       "--shapes", "256x128", "--repeats", "1", "--check-kernels", "fma", "--check-unpacks",
       "magic", "--out", str(out))
  result = json.loads(out.read_text())
  assert "table" not in result
  assert {(c["kernel"], c["unpack"], c["m"]) for c in result["check"]} == {("fma", "magic", 1),
                                                                           ("fma", "magic", 3)}
  assert all(c["rel_err"] < 1e-2 for c in result["check"])
  seen = {(r["bits"], r["cfg"]["kernel"], r["cfg"]["unpack"], r["cfg"]["fma_reduce"],
           r["cfg"]["x_load"], r["cfg"]["w_layout"]) for r in result["variants"]}
  assert seen == {(b, k, u, "step", "strided", "kn") for b in (8, 4) for k in ("dot", "dot_t")
                  for u in ("shift", "magic")} | {
                      (4, k, "shift", "step", "split", "kn") for k in ("dot", "dot_t")} | {
                          (b, "fma", u, red, "strided", "kn") for b in (8, 4) for u, red in
                          (("shift", "end"), ("magic", "end"), ("shift", "step"))} | {
                              (8, "dot", "shift", "step", "strided", "nk")} | {
                                  (4, "dot", u, "step", "strided", lay) for u, lay in
                                  (("shift", "nk"), ("prmt", "kn"), ("prmt", "nk"))}
  for r in result["variants"]:
    assert r["us"] > 0 and r["err"] < 1e-2 and r["bf16_us"] > 0, r


def test_quantized_matmul_benchmark_checks_and_times_the_code_layouts(tmp_path):
  """--variant-set layouts: the dot kernel with the codes as stored and transposed (int4 with the
  shift and prmt unpacks) and the default fma kernel; --check-layouts / --check-unpacks check
  the transposed layout and the prmt unpack on the odd shapes (prmt only where it applies)."""
  out = tmp_path / "qmm_layouts.json"
  _run("quantized_matmul.py", "--interpret", "--variants", "--variant-set", "layouts",
       "--variants-m", "1", "--skip-table", "--shapes", "256x128", "--repeats", "1",
       "--check-kernels", "dot", "--check-unpacks", "shift", "prmt", "--check-layouts", "kn",
       "nk", "--check-m", "3", "--sweep", "--sweep-m", "1", "--sweep-shape", "256x128",
       "--sweep-layout", "nk", "--sweep-int4-unpack", "prmt", "--out", str(out))
  result = json.loads(out.read_text())
  checked = {(c["bits"], c["unpack"], c["w_layout"]) for c in result["check"]}
  assert checked == {(8, "shift", "kn"), (8, "shift", "nk")} | {
      (4, u, lay) for u in ("shift", "prmt") for lay in ("kn", "nk")}
  assert all(c["rel_err"] < 1e-2 for c in result["check"]), result["check"]
  seen = {(r["bits"], r["cfg"]["kernel"], r["cfg"]["unpack"], r["cfg"]["w_layout"])
          for r in result["variants"]}
  assert seen == {(8, "dot", "shift", "kn"), (8, "dot", "shift", "nk"), (8, "fma", "shift", "kn"),
                  (4, "fma", "shift", "kn")} | {
                      (4, "dot", u, lay) for u in ("shift", "prmt") for lay in ("kn", "nk")}
  for r in result["variants"]:
    assert r["us"] > 0 and r["err"] < 1e-2, r
  # the sweep around the transposed layout: dot-kernel tilings only, all with the codes
  # transposed and int4 through prmt; the base tiling was timed
  sweep = result["sweep"]
  assert {r["cfg"]["kernel"] for r in sweep} == {"dot"}
  assert {r["cfg"]["w_layout"] for r in sweep} == {"nk"}
  assert {r["cfg"]["unpack"] for r in sweep if r["bits"] == 4} == {"prmt"}
  assert all(isinstance(r["us"], float) for r in sweep if r["default"])


def test_generate_times_other_samplers(tmp_path):
  # 'auto' is XLA on CPU (timed); the Triton kernel without a GPU is a recorded error, not a crash
  out = tmp_path / "generate.json"
  _run("generate.py", "--config", "tiny", "--batch", "2", "--prompt-len", "4", "--new-tokens", "4",
       "--repeats", "1", "--copy-mib", "8", "--no-baseline", "--sampling-impl", "xla", "auto",
       "pallas", "--decode-attention", "xla", "pallas", "--out", str(out))
  (row,) = json.loads(out.read_text())["rows"]
  # the decode-attention kernel column (interpret mode on CPU: timed, not meaningful)
  assert row["postrl_decode_attention"] == "xla" and row["postrl_attention_pallas_tokens_per_s"] > 0
  assert row["postrl_tokens_per_s"] > 0 and row["postrl_auto_tokens_per_s"] > 0
  # the first --sampling-impl gives the row's numbers; what it ran is recorded (on CPU: XLA's
  # 32-pass bisection, default_bits_per_pass)
  assert row["postrl_sampling_impl"] == "xla" and row["postrl_sampler"] == "xla (1 bits a pass)"
  assert "GPU" in row["postrl_pallas_error"] and "postrl_pallas_tokens_per_s" not in row


def test_qmm_profile_runs_every_variant_and_summarises_an_ncu_csv(tmp_path):
  """benchmarks/qmm_profile.py: the run half launches each variant (interpret mode here) and
  records what ran; the summarise half reads ncu's raw CSV (lines before the header skipped,
  durations in ns -> us, the stall reasons sorted by share) and refuses a file with no header."""
  manifest = tmp_path / "variants.json"
  _run("qmm_profile.py", "--interpret", "--m", "3", "--k", "256", "--n", "128", "--calls", "1",
       "--variants", "4:dot:prmt:nk", "8:dot:shift:nk", "4:fma:shift:kn", "--manifest",
       str(manifest))
  ran = json.loads(manifest.read_text())["variants"]
  assert [(v["bits"], v["kernel"], v["unpack"], v["layout"]) for v in ran] == [
      (4, "dot", "prmt", "nk"), (8, "dot", "shift", "nk"), (4, "fma", "shift", "kn")]
  names = ["ID", "Kernel Name", "Grid Size", "gpu__time_duration.sum",
           "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
           "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
           "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"]
  units = ["", "", "", "nsecond", "%", "inst", "inst"]
  rows = [["0", "quantized_matmul_int4_dot", "(512, 1, 2)", "38,700", "30.5", "4.2", "9.1"],
          ["1", "quantized_matmul_int8_dot", "(64, 1, 2)", "21000", "70", "1.5", "0.5"]]
  text = "==PROF== Connected to process 1\n" + "\n".join(
      ",".join(f'"{v}"' for v in line) for line in [names, units] + rows) + "\n==PROF== done\n"
  raw = tmp_path / "ncu_raw.csv"
  raw.write_text(text)
  out_json = tmp_path / "summary.json"
  printed = _run("qmm_profile.py", "--summarise", str(raw), "--manifest", str(manifest),
                 "--summary-json", str(out_json))
  summary = json.loads(out_json.read_text())
  first, second = summary["launches"]
  assert first["duration_us"] == pytest.approx(38.7) and first["dram_pct"] == 30.5
  assert [k for k, _ in first["stalls"]] == ["barrier", "long_scoreboard"]
  assert [k for k, _ in second["stalls"]] == ["long_scoreboard", "barrier"]
  assert summary["run"]["variants"][0]["unpack"] == "prmt"
  assert "4:dot:prmt:nk" in printed and "barrier 9.1" in printed
  raw.write_text("==PROF== No kernels were profiled.\n")
  proc = subprocess.run([sys.executable, "benchmarks/qmm_profile.py", "--summarise", str(raw)],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "no ncu CSV header" in proc.stderr


def test_generate_times_and_counts_the_fused_decode_layer(tmp_path):
  """--decode-block xla pallas: the row's numbers with XLA's layer, then the fused kernels
  (interpret mode on CPU, where each kernel is a loop over its grid: the counts mean something on
  a GPU only, ``xla_gpu_offline.py``) timed and launch-counted beside them."""
  out = tmp_path / "generate.json"
  _run("generate.py", "--config", "tiny", "--batch", "1", "--prompt-len", "4", "--new-tokens", "3",
       "--repeats", "1", "--copy-mib", "8", "--no-baseline", "--launches", "--top-p", "1.0",
       "--decode-block", "xla", "pallas", "--out", str(out))
  (row,) = json.loads(out.read_text())["rows"]
  assert row["postrl_decode_block"] == "xla" and "postrl_block_pallas_error" not in row, row
  assert row["postrl_block_pallas_tokens_per_s"] > 0
  xla, fused = row["postrl_launches_per_step"], row["postrl_block_pallas_launches_per_step"]
  assert xla["launches"] > 0 and fused["launches"] > 0 and fused != xla


def test_decode_block_checks_then_times_both_layers(tmp_path):
  """benchmarks/decode_block.py on CPU (interpret mode): the check passes, then both
  implementations of a step's layers are timed and launch-counted beside the read floor."""
  out = tmp_path / "decode_block.json"
  _run("decode_block.py", "--interpret", "--config", "tiny", "--batch", "1", "--steps", "2",
       "--repeats", "1", "--biases", "--out", str(out))
  doc = json.loads(out.read_text())
  assert doc["status"] == "complete"
  assert [c["biases"] for c in doc["checks"]] == [False, True] and all(c["ok"] for c in doc["checks"])
  kernel_impls = ("pallas", "pallas_attention", "pallas_mlp", "pallas_persistent")
  for c in doc["checks"]:  # every kernel implementation against XLA's layer, in float32
    assert sorted(c["max_rel_err"]) == sorted(kernel_impls)
    assert set(c["barrier_timeouts"].values()) == {0}
    assert all(e < 1e-5 for by_name in c["max_rel_err"].values() for e in by_name.values())
  (row,) = doc["rows"]
  assert row["xla_us"] > 0 and row["floor_us"] > 0 and row["xla_launches"] > 0
  for impl in kernel_impls:  # (interpret mode: the counts are XLA:CPU's, not the GPU's)
    assert row[f"{impl}_us"] > 0 and row[f"xla_over_{impl}"] > 0 and row[f"{impl}_launches"] > 0
  trace = row["pallas_persistent_trace"]  # interpret mode: one program, counter values
  assert trace["programs"] == 1 and trace["barrier_timeouts"] == 0 and "phase_5_us" in trace
  verdict = triage_summary.decode_block_verdict(doc)  # what gpu_triage.sh prints
  assert verdict.startswith("issue 9: tiny batch 1: XLA layers") and "pallas_persistent" in verdict


def test_decode_block_times_the_others_when_one_check_fails(tmp_path, monkeypatch):
  """An implementation whose check fails (here the persistent layer, made wrong by 1) is named in
  ``check_failed`` and not timed; XLA's layer and the five launches are still checked and timed,
  and the triage verdict says both."""
  from benchmarks import decode_block as bench  # pylint: disable=import-outside-toplevel
  real = bench.decode_layers

  def broken(*args, impl, **kwargs):
    x, ks, vs, sync = real(*args, impl=impl, **kwargs)
    return (x + 1.0 if impl == "pallas_persistent" else x), ks, vs, sync
  monkeypatch.setattr(bench, "decode_layers", broken)
  doc = bench.main(["--interpret", "--config", "tiny", "--batch", "1", "--steps", "2",
                    "--repeats", "1", "--impls", "xla", "pallas", "pallas_persistent",
                    "--out", str(tmp_path / "decode_block.json")])
  assert doc["status"] == "complete" and doc["check_failed"] == ["pallas_persistent"]
  (check,) = doc["checks"]
  assert check["ok_by_impl"] == {"pallas": True, "pallas_persistent": False}
  (row,) = doc["rows"]
  assert row["xla_us"] > 0 and row["pallas_us"] > 0 and "pallas_persistent_us" not in row
  verdict = triage_summary.decode_block_verdict(doc)
  assert "check FAILED for pallas_persistent" in verdict and "pallas " in verdict.splitlines()[1]


def test_continuous_tiny(tiny_model_dir, tmp_path):
  """Fixed batches vs continuous batching on a tiny saved model: greedy, so both modes must give
  the same tokens (the script fails otherwise), every row and speed-up in the JSON."""
  out = tmp_path / "continuous.json"
  stdout = _run("continuous.py", "--model", tiny_model_dir, "--prompts", "5", "--slots", "2", "4",
                "--new-tokens", "4", "--repeats", "1", "--temperature", "0", "--one-batch",
                "--out", str(out))
  doc = json.loads(out.read_text())
  assert "check_failed" not in doc and "continuous batching is" in stdout
  assert [(r["mode"], r["slots"]) for r in doc["rows"]] == [
      ("batches", 2), ("continuous", 2), ("batches", 4), ("continuous", 4), ("one_batch", 5)]
  for r in doc["rows"]:
    assert r["generated_tokens"] == 5 * 4 and r["seconds"] > 0  # no EOS from random weights
  # B = 2: batches of 2, 2, 1 prompts take 3 x 4 steps; 2 slots refilled one at a time take 12
  assert doc["rows"][0]["decode_steps"] == 12
  assert [s["slots"] for s in doc["speedups"]] == [2, 4]
  assert doc["environment"]["backend"] == "cpu" and doc["prompts"] == 5
