"""Forward KL vs reverse KL vs JSD distillation: the student's task accuracy and its KL to the
teacher, one run per divergence through ``launch.py``, then a table and a plot.

    python experiments/distillation/run.py                       # teacher + 3 runs, CPU sizes
    python experiments/distillation/run.py --methods forward_kl,gkd_jsd --extra=--config.steps=60

The teacher is SmolLM2-135M-Instruct after ``configs/sft_arith.py`` (40 SFT steps on worked
2-digit arithmetic answers, about 50% exact match), trained once into ``--out/teacher`` and
exported as a HF folder. Each student starts from that teacher's embeddings, head and 15 evenly
spaced layers and is distilled on the same worked answers (``configs/distill_arith.py``: 30 steps
of 16 packed rows); only the divergence changes (``METHODS``). Runs already finished in ``--out``
with the same flags are reused (other flags are an error: delete a folder to rerun it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from experiments import common  # pylint: disable=wrong-import-position

# name -> overrides of configs/distill_arith.py
METHODS = {
    "forward_kl": ["--config.loss.divergence=forward_kl"],
    "reverse_kl": ["--config.loss.divergence=reverse_kl"],
    "jsd": ["--config.loss.divergence=jsd", "--config.loss.beta=0.5"],
    # GKD (Agarwal et al. 2024): the same JSD, half of the steps on the student's own samples
    "gkd_jsd": ["--config.loss.divergence=jsd", "--config.loss.beta=0.5", "--config.loss.lmbda=0.5"],
}


def launch(name: str, workdir: str, flags: list[str]) -> None:
  common.launch(name, [sys.executable, os.path.join(ROOT, "launch.py"), "--workdir", workdir,
                       *flags], ROOT)


def teacher(out: str, extra: list[str]) -> str:
  """The SFT teacher's HF folder (trained once into ``out/teacher``)."""
  workdir = os.path.join(out, "teacher")
  model = os.path.join(workdir, "model")
  if not os.path.exists(os.path.join(model, "config.json")):
    launch("teacher", workdir, ["--config", "configs/sft_arith.py", "--config.save_model=True",
                                *extra])
  else:
    print(f"teacher: reusing {model}")
  return model


def run_method(name: str, out: str, teacher_dir: str, extra: list[str]) -> str:
  workdir = os.path.join(out, name)
  flags = ["--config", "configs/distill_arith.py", f"--config.teacher={teacher_dir}",
           "--config.eval.every=15", "--config.checkpoint.every=1000", *METHODS[name], *extra]
  if not common.reuse(name, workdir, flags):
    launch(name, workdir, flags)
  return workdir


def summarise(workdir: str) -> dict:
  """Eval curves of one run (metrics.jsonl) and its results.json."""
  from postrl.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  evals = [r for r in records if "eval/accuracy" in r]
  secs = sorted(r["perf/step_seconds"] for r in records if "perf/step_seconds" in r)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  curve = {key: {r["step"]: r[f"eval/{key}"] for r in evals if f"eval/{key}" in r}
           for key in ("accuracy", "kl_forward", "kl_reverse", "top1_agreement", "nll")}
  return dict(curve=curve, seconds_per_step=secs[len(secs) // 2] if secs else None,
              teacher_accuracy=results.get("teacher_accuracy"),
              num_eval_problems=results.get("num_eval_problems"))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", default="forward_kl,reverse_kl,jsd")
  parser.add_argument("--out", default=os.path.join(ROOT, "runs", "distillation"))
  parser.add_argument("--extra", action="append", default=[],
                      help="more launch.py flags for every student run")
  args = parser.parse_args(argv)
  names = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(names) - set(METHODS))
  if unknown or not names:  # checked before the teacher trains
    parser.error(f"unknown methods {unknown}; known: {sorted(METHODS)}" if names else
                 f"--methods names no method; known: {sorted(METHODS)}")
  common.check_out(parser, args.out)
  teacher_dir = teacher(args.out, [])
  results = {name: summarise(run_method(name, args.out, teacher_dir, args.extra))
             for name in names}
  common.write_json(os.path.join(args.out, "summary.json"), results, indent=1)

  first = next(iter(results.values()))
  print(f"teacher exact match: {100 * first['teacher_accuracy']:.1f}% "
        f"({first['num_eval_problems']} problems)")
  print("| divergence | student acc. before | after | KL(teacher‖student) before | after | "
        "KL(student‖teacher) after | top-1 agreement after | s/step |")
  print("|---|---|---|---|---|---|---|---|")
  for name, r in results.items():
    c = r["curve"]
    steps = sorted(c["accuracy"])
    s0, s1 = steps[0], steps[-1]
    print(f"| {name} | {100 * c['accuracy'][s0]:.1f}% | {100 * c['accuracy'][s1]:.1f}% | "
          f"{c['kl_forward'][s0]:.3f} | {c['kl_forward'][s1]:.3f} | {c['kl_reverse'][s1]:.3f} | "
          f"{100 * c['top1_agreement'][s1]:.1f}% | {r['seconds_per_step']:.1f} |")

  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(10, 3.6), layout="constrained")
  ax1, ax2 = fig.subplots(1, 2)
  for name, r in results.items():
    acc = sorted(r["curve"]["accuracy"].items())
    ax1.plot([s for s, _ in acc], [100 * v for _, v in acc], marker="o", label=name)
    for key, style in (("kl_forward", "-"), ("kl_reverse", "--")):
      pts = sorted(r["curve"][key].items())[1:]  # step 0 (~9 nats) would flatten the rest
      ax2.plot([s for s, _ in pts], [v for _, v in pts], style, marker="o",
               label=f"{name} {'KL(p‖q)' if key == 'kl_forward' else 'KL(q‖p)'}")
  ax1.axhline(100 * first["teacher_accuracy"], color="gray", ls=":", label="teacher")
  ax1.set(xlabel="optimizer step", ylabel="held-out exact match (%)", title="student accuracy")
  ax2.set(xlabel="optimizer step", ylabel="nats per token", yscale="log",
          title="held-out KL, p teacher, q student")
  ax1.legend()
  ax2.legend(fontsize=7)
  path = os.path.join(args.out, "distillation.png")
  fig.savefig(path, dpi=120)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
