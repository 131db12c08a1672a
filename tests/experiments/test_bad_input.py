"""The experiment runners refuse bad flags before any work (one line, exit 2), stop with one line
when a launch.py run fails, never reuse a finished run made with other flags, and write their
results atomically. No model is loaded and no launch.py runs: ``subprocess.run`` is faked."""

import importlib.util
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _runner(name):
  spec = importlib.util.spec_from_file_location(
      f"{name}_run", os.path.join(ROOT, "experiments", name, "run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _Fake:
  """``subprocess.run`` stand-in: records the commands; ``code`` is the exit status; with
  ``finish`` a run writes the results.json and metrics.jsonl of a finished run."""

  def __init__(self, code=0, finish=False):
    self.calls, self.code, self.finish = [], code, finish

  def __call__(self, cmd, **kwargs):
    del kwargs
    self.calls.append(cmd)
    if self.finish:
      workdir = cmd[cmd.index("--workdir") + 1]
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps({"step": 1, "loss": 1.0, "perf/step_seconds": 2.0}) + "\n")
        f.write(json.dumps({"step": 1, "eval/accuracy": 0.5}) + "\n")
      with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({}, f)
    return subprocess.CompletedProcess(cmd, self.code)


@pytest.fixture(name="fake_run")
def _fake_run(monkeypatch):
  fake = _Fake()
  monkeypatch.setattr(subprocess, "run", fake)
  return fake


def _no_work(*args, **kwargs):
  raise AssertionError("work started before the flags were checked")


def _error(capsys, call) -> str:
  with pytest.raises(SystemExit) as e:
    call()
  assert e.value.code == 2
  return capsys.readouterr().err


@pytest.mark.parametrize("name,argv,message", [
    ("rl_algorithms", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("rl_algorithms", ["--eval_every", "-1"], "--eval_every must be at least 1, got -1"),
    ("rl_algorithms", ["--methods", ","], "--methods names no method"),
    ("preference_losses", ["--methods", ""], "--methods names no method"),
    ("distillation", ["--methods", ","], "--methods names no method"),  # the teacher trained first
    ("reward_models", ["--ks", "2,x"], "--ks must be comma-separated integers, got '2,x'"),
    ("reward_models", ["--ks", "1,2"], "--ks: every value must be at least 2"),
    ("reward_models", ["--num_samples", "4"], "--num_samples must be at least 8, got 4"),
    ("reward_models", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("reward_models", ["--lr", "nan"], "--lr must be a positive number, got nan"),
    ("compression", ["--tiny", "--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    ("compression", ["--tiny", "--methods", ","], "--methods names no method"),
    ("test_time_scaling", ["--n", "0"], "--n must be a power of 2"),
    ("test_time_scaling", ["--widths", "2,x"], "--widths must be comma-separated integers"),
    ("test_time_scaling", ["--simulations", "0,3"], "--simulations: every value must be at least"),
    ("test_time_scaling", ["--num_problems", "0"], "--num_problems must be at least 2, got 0"),
    ("test_time_scaling", ["--temperature", "0"], "--temperature must be a positive number"),
    ("test_time_scaling", ["--rm_data", "/nonexistent/pairs.jsonl"], "no such file"),
    ("test_time_scaling", ["--search_tasks", "countdwn"], "unknown tasks / stages ['countdwn']"),
    ("test_time_scaling", ["--rollouts", "0"], "--rollouts must be at least 1, got 0"),
])
def test_bad_flags_stop_before_any_work(name, argv, message, tmp_path, capsys, monkeypatch,
                                        fake_run):
  run = _runner(name)
  for attr in ("sample", "load", "task_problems", "reward_model_prompts"):  # the slow first steps
    if hasattr(run, attr):
      monkeypatch.setattr(run, attr, _no_work)
  err = _error(capsys, lambda: run.main(argv + ["--out", str(tmp_path / "out")]))
  assert message in err
  assert not fake_run.calls and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("name", ["rl_algorithms", "preference_losses", "distillation",
                                  "reward_models", "compression", "test_time_scaling"])
def test_out_that_is_a_file(name, tmp_path, capsys, monkeypatch, fake_run):
  run = _runner(name)
  for attr in ("sample", "load"):
    if hasattr(run, attr):
      monkeypatch.setattr(run, attr, _no_work)
  (tmp_path / "out").write_text("a file")
  argv = ["--out", str(tmp_path / "out" / "sub")] + (["--tiny"] if name == "compression" else [])
  err = _error(capsys, lambda: run.main(argv))
  assert f"--out {tmp_path / 'out' / 'sub'}: {tmp_path / 'out'} is a file, not a folder" in err
  assert not fake_run.calls


def test_failed_launch_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setattr(subprocess, "run", _Fake(code=1))
  run = _runner("rl_algorithms")
  with pytest.raises(SystemExit) as e:  # was a CalledProcessError traceback
    run.main(["--methods", "grpo", "--out", str(tmp_path)])
  assert str(e.value).startswith("grpo: launch.py exited with code 1 (its error is above)")


def test_finished_run_reused_only_with_its_flags(tmp_path, monkeypatch):
  fake = _Fake(finish=True)
  monkeypatch.setattr(subprocess, "run", fake)
  run = _runner("rl_algorithms")
  argv = ["--methods", "grpo,rloo", "--steps", "2", "--eval_every", "1", "--out", str(tmp_path)]
  run.main(argv)
  assert len(fake.calls) == 2
  with open(tmp_path / "summary.json", encoding="utf-8") as f:
    assert json.load(f)["grpo"]["accuracy"] == {"1": 0.5}
  run.main(argv)  # the same flags: both runs reused
  assert len(fake.calls) == 2
  # another --steps used to reuse the 2-step runs silently and report them as the 5-step ones
  with pytest.raises(SystemExit, match="grpo: .*grpo holds a run made with other flags"):
    run.main(argv[:2] + ["--steps", "5"] + argv[4:])
  assert len(fake.calls) == 2


def test_compression_keeps_the_other_sizes_results(tmp_path, capsys, monkeypatch):
  run = _runner("compression")
  monkeypatch.setattr(run, "load", _no_work)
  results = tmp_path / "results.json"
  saved = json.dumps({"tiny": False, "methods": {"gptq_int4_g128": {"ppl": 20.1}}})
  results.write_text(saved)
  # a --tiny run into the full-size run's folder used to overwrite its (hour-long) results
  err = _error(capsys, lambda: run.main(["--tiny", "--out", str(tmp_path)]))
  assert "holds the full-size model's results; use another --out" in err
  assert results.read_text() == saved
  results.write_text(saved[:20])  # torn by a crash of the old, non-atomic save
  err = _error(capsys, lambda: run.main(["--tiny", "--out", str(tmp_path)]))
  assert "results.json is not valid JSON" in err and "--rerun" in err


def test_write_json_is_atomic(tmp_path):
  from experiments import common  # pylint: disable=import-outside-toplevel
  path = tmp_path / "summary.json"
  common.write_json(str(path), {"a": 1})
  with pytest.raises(TypeError):  # fails half-way through the dump
    common.write_json(str(path), {"a": 2, "b": object()})
  assert json.loads(path.read_text()) == {"a": 1}
  assert os.listdir(tmp_path) == ["summary.json"]
