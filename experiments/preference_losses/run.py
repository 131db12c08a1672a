"""DPO vs IPO vs SimPO vs KTO vs ORPO on verifier-made preference pairs: held-out preference
accuracy and task accuracy, one run per loss through ``launch.py``, then a table and a plot.

    python experiments/preference_losses/run.py                 # 5 runs, CPU sizes (~45 min)
    python experiments/preference_losses/run.py --methods dpo,simpo --extra=--config.steps=60

Every loss trains ``configs/dpo_arith.py``'s model on the same pairs in the same order: the first
run samples them (SmolLM2-135M-Instruct answering 1-digit arithmetic problems, scored by the
task's verifier) and caches them in its workdir; the others read that file
(``--config.data.path``). Only the loss and its own hyper-parameters change (``METHODS``).
Runs already finished in ``--out`` with the same flags are reused (other flags are an error:
delete a folder to rerun it).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from experiments import common  # pylint: disable=wrong-import-position

CONFIG = "configs/dpo_arith.py"
# name -> overrides of configs/dpo_arith.py. Hyper-parameters follow each paper's recommendation
# for this scale where it gives one; the learning rate (5e-6) and data are shared.
METHODS = {
    "dpo": ["--config.loss.name=dpo", "--config.loss.variant=sigmoid", "--config.loss.beta=0.1"],
    "ipo": ["--config.loss.name=dpo", "--config.loss.variant=ipo", "--config.loss.beta=0.1"],
    "simpo": ["--config.loss.name=simpo", "--config.loss.beta=2.0", "--config.loss.gamma=0.5"],
    "kto": ["--config.loss.name=kto", "--config.loss.beta=0.1"],
    "orpo": ["--config.loss.name=orpo", "--config.loss.lam=0.1"],
}
DATA_FILES = ("data/train_pairs.jsonl", "data/eval_pairs.jsonl")


def run_method(name: str, out: str, data_dir: str | None, extra: list[str]) -> str:
  """Run one loss into ``out/name`` (reused when finished with the same flags)."""
  workdir = os.path.join(out, name)
  # the data flags are left out of the comparison: whichever run comes first samples the pairs
  flags = ["--config", CONFIG, "--config.eval.every=15", "--config.checkpoint.every=1000",
           *METHODS[name], *extra]
  if common.reuse(name, workdir, flags):
    return workdir
  data = []
  if data_dir is not None:
    train, held = (os.path.join(data_dir, f) for f in DATA_FILES)
    data = [f"--config.data.path={train}", f"--config.data.eval_path={held}"]
  common.launch(name, [sys.executable, os.path.join(ROOT, "launch.py"), "--workdir", workdir,
                       *flags, *data], ROOT)
  return workdir


def summarise(workdir: str) -> dict:
  """Eval curves and final numbers of one run from its metrics.jsonl and results.json."""
  from postrl.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  evals = [r for r in records if "eval/accuracy" in r]
  secs = sorted(r["perf/step_seconds"] for r in records if "perf/step_seconds" in r)
  last_train = ([r for r in records if "loss" in r] or [{}])[-1]  # {}: no step logged
  curve = {key: {r["step"]: r[f"eval/{key}"] for r in evals if f"eval/{key}" in r}
           for key in ("accuracy", "pref_accuracy", "logp_accuracy", "avg_logp_accuracy",
                       "pref_margin")}
  return dict(curve=curve, seconds_per_step=secs[len(secs) // 2] if secs else None,
              final_train_loss=last_train.get("loss"),
              final_train_reward_accuracy=last_train.get("rewards/accuracy"))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--out", default=os.path.join(ROOT, "runs", "preference_losses"))
  parser.add_argument("--extra", action="append", default=[],
                      help="more launch.py flags for every run, e.g. --extra=--config.seed=1")
  args = parser.parse_args(argv)
  names = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(names) - set(METHODS))
  if unknown or not names:
    parser.error(f"unknown methods {unknown}; known: {sorted(METHODS)}" if names else
                 f"--methods names no method; known: {sorted(METHODS)}")
  common.check_out(parser, args.out)
  results, data_dir = {}, None
  for name in names:
    workdir = run_method(name, args.out, data_dir, args.extra)
    if data_dir is None and all(os.path.exists(os.path.join(workdir, f)) for f in DATA_FILES):
      data_dir = workdir  # the first run's verifier-made pairs feed every later run
    results[name] = summarise(workdir)
  common.write_json(os.path.join(args.out, "summary.json"), results, indent=1)

  def pct(curve, step):
    return f"{100 * curve[step]:.1f}%" if step in curve else ""

  print("| loss | task acc. before | after | held-out implicit-reward acc. after | "
        "policy log-prob acc. before -> after | per-token log-prob acc. before -> after | "
        "s/step |")
  print("|---|---|---|---|---|---|---|")
  for name, r in results.items():
    c = r["curve"]
    steps = sorted(c["accuracy"]) or [None]  # no evaluation (--extra=--config.eval.every=0)
    first, last = steps[0], steps[-1]
    sps = f"{r['seconds_per_step']:.1f}" if r["seconds_per_step"] else ""
    print(f"| {name} | {pct(c['accuracy'], first)} | {pct(c['accuracy'], last)} | "
          f"{pct(c['pref_accuracy'], last)} | {pct(c['logp_accuracy'], first)} -> "
          f"{pct(c['logp_accuracy'], last)} | {pct(c['avg_logp_accuracy'], first)} -> "
          f"{pct(c['avg_logp_accuracy'], last)} | {sps} |")

  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(10, 3.6), layout="constrained")
  ax1, ax2 = fig.subplots(1, 2)
  for name, r in results.items():
    for ax, key in ((ax1, "accuracy"), (ax2, "pref_accuracy")):
      pts = sorted(r["curve"][key].items())
      ax.plot([s for s, _ in pts], [100 * v for _, v in pts], marker="o", label=name)
  ax1.set(xlabel="optimizer step", ylabel="held-out task accuracy (%)", title="greedy exact match")
  ax2.set(xlabel="optimizer step", ylabel="accuracy (%)",
          title="held-out pairs: β log π/π_ref(chosen) > (rejected)")
  ax1.legend()
  path = os.path.join(args.out, "preference_losses.png")
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
