"""GRPO vs Dr. GRPO vs DAPO vs GSPO vs RLOO vs PPO on the main job's task: held-out accuracy vs
steps, one run per method through ``launch.py``, then a table (README) and a plot.

    python experiments/rl_algorithms/run.py              # grpo, dr_grpo, dapo, rloo, ppo; CPU sizes
    python experiments/rl_algorithms/run.py --methods grpo,ppo --steps 40 --extra=--config.dtype=bfloat16

Each method runs ``configs/grpo_arith.py`` (or ``configs/ppo_arith.py``) with only the algorithm
changed: the same prompts per step, samples per prompt, reward, learning rate and evaluation
(greedy exact match on the same held-out problems every ``--eval_every`` steps). Runs already
finished in ``--out`` with the same flags are reused (another ``--steps`` or ``--extra`` is an
error: delete a folder to rerun it).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from experiments import common  # pylint: disable=wrong-import-position

# name -> (config, overrides). Every method trains on 32 sampled completions per optimizer step:
# 4 prompts x 8 samples for the group methods, 8 prompts x 4 samples (one update each) for PPO.
GROUP = ["--config.rollout.prompts=4", "--config.rollout.group_size=8"]
METHODS = {
    "grpo": ("configs/grpo_arith.py", ["--config.loss.algorithm=grpo", *GROUP]),
    "dr_grpo": ("configs/grpo_arith.py", ["--config.loss.algorithm=dr_grpo", *GROUP]),
    "dapo": ("configs/grpo_arith.py", ["--config.loss.algorithm=dapo", *GROUP]),
    "dapo_no_overlong": ("configs/grpo_arith.py", ["--config.loss.algorithm=dapo",
                                                   "--config.loss.overlong=False", *GROUP]),
    "gspo": ("configs/grpo_arith.py", ["--config.loss.algorithm=gspo", *GROUP]),
    "rloo": ("configs/grpo_arith.py", ["--config.loss.algorithm=rloo", *GROUP]),
    "ppo": ("configs/ppo_arith.py", ["--config.rollout.prompts=8", "--config.rollout.group_size=4",
                                     "--config.rollout.minibatches=1"]),
}


def run_method(name: str, out: str, steps: int, eval_every: int, extra: list[str]) -> str:
  workdir = os.path.join(out, name)
  config, overrides = METHODS[name]
  flags = ["--config", config, f"--config.steps={steps}", f"--config.eval.every={eval_every}",
           f"--config.checkpoint.every={steps}", *overrides, *extra]
  if common.reuse(name, workdir, flags):
    return workdir
  common.launch(name, [sys.executable, os.path.join(ROOT, "launch.py"), "--workdir", workdir,
                       *flags], ROOT)
  return workdir


def curves(workdir: str) -> dict:
  from postrl.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  acc = {r["step"]: r["eval/accuracy"] for r in records if "eval/accuracy" in r}
  reward = {r["step"]: r["rollout/reward_mean"] for r in records if "rollout/reward_mean" in r}
  secs = [r["perf/step_seconds"] for r in records if "perf/step_seconds" in r]
  return dict(accuracy=acc, reward=reward,
              seconds_per_step=sorted(secs)[len(secs) // 2] if secs else None)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", default="grpo,dr_grpo,dapo,rloo,ppo")
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--eval_every", type=int, default=6)
  parser.add_argument("--out", default=os.path.join(ROOT, "runs", "rl_algorithms"))
  parser.add_argument("--extra", action="append", default=[],
                      help="more launch.py flags for every run, e.g. --extra=--config.seed=1")
  args = parser.parse_args(argv)
  names = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(names) - set(METHODS))
  if unknown or not names:
    parser.error(f"unknown methods {unknown}; known: {sorted(METHODS)}" if names else
                 f"--methods names no method; known: {sorted(METHODS)}")
  common.check_at_least(parser, 1, steps=args.steps, eval_every=args.eval_every)
  common.check_out(parser, args.out)
  results = {}
  for name in names:
    results[name] = curves(run_method(name, args.out, args.steps, args.eval_every, args.extra))
  common.write_json(os.path.join(args.out, "summary.json"), results, indent=1)

  steps = sorted({s for r in results.values() for s in r["accuracy"]})
  print("| method | " + " | ".join(f"step {s}" for s in steps) + " | s/step (median) |")
  print("|---|" + "---|" * (len(steps) + 1))
  for name, r in results.items():
    cells = [f"{100 * r['accuracy'][s]:.0f}%" if s in r["accuracy"] else "" for s in steps]
    sps = f"{r['seconds_per_step']:.0f}" if r["seconds_per_step"] else ""
    print(f"| {name} | " + " | ".join(cells) + f" | {sps} |")

  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(10, 3.6), layout="constrained")
  ax1, ax2 = fig.subplots(1, 2)
  for name, r in results.items():
    a = sorted(r["accuracy"].items())
    ax1.plot([s for s, _ in a], [100 * v for _, v in a], marker="o", label=name)
    w = sorted(r["reward"].items())
    ax2.plot([s for s, _ in w], [v for _, v in w], label=name, alpha=0.8)
  ax1.set(xlabel="optimizer step", ylabel="held-out accuracy (%)", title="greedy exact match")
  ax2.set(xlabel="optimizer step", ylabel="mean reward", title="rollout reward (temperature 1)")
  ax1.legend()
  fig.savefig(os.path.join(args.out, "rl_algorithms.png"), dpi=120)
  print(f"wrote {os.path.join(args.out, 'rl_algorithms.png')}")


if __name__ == "__main__":
  main()
