"""Bradley-Terry vs Plackett-Luce reward models as the number K of ranked responses per prompt
grows: every model is trained on the same prompts and evaluated on the same held-out rankings.

    python experiments/reward_models/run.py          # K = 2, 4, 8; ~30 min on a 2-core CPU alone
    python experiments/reward_models/run.py --ks auto  # the largest K the sampled data supports
    python experiments/reward_models/run.py --ks 2,3,4 --steps 30 --extra=--config.optim.lr=2e-5

1. The policy (SmolLM2-135M-Instruct) answers every training and held-out prompt of the 1-digit
   arithmetic task of ``configs/rm_arith.py`` ``--num_samples`` times (temperature 1), ONCE; the
   graded verifier reward (``postrl.data.preference.graded_arithmetic_reward``: right answers
   first, wrong ones by closeness, shorter first among equals) orders them, and
   ``postrl.data.verifier.rankings`` keeps, per prompt with enough distinct reward levels, a
   ranking of K_max = max(--ks) responses (``<out>/data``).
2. The training set of a smaller K keeps, from each K_max ranking, the responses at the first K
   positions of a seeded random permutation, in their ranked order: the subsets are nested
   (K = 2 inside K = 4 inside K = 8), so every K sees the same prompts and the same rankings.
3. One ``launch.py`` run (``configs/rm_arith.py``) per (K, loss): Bradley-Terry on all C(K,2)
   pairs of each ranking (InstructGPT) and Plackett-Luce; K = 2 is one run (the two losses are
   the same there). Same steps, batch of rankings, seed and data order for all; every model is
   evaluated on the same held-out rankings of K_max (pairwise accuracy over all C(K_max, 2)
   pairs, top-1 and full-order accuracy). Runs finished in ``--out`` with the same flags are
   reused (other flags are an error: delete a folder to rerun it).

Writes ``<out>/summary.json``, prints a markdown table (with 90% intervals from a bootstrap over
the held-out rankings, read from each run's ``eval/scores_step{steps}.npz``, and the paired
differences PL - BT and larger K - smaller K over the same resampled rankings) and plots
``<out>/reward_models.png``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from experiments import common  # pylint: disable=wrong-import-position

TASK = dict(name="arithmetic", digits=1, ops="+-")
LOSSES = ("bradley_terry", "plackett_luce")


# -------------------------------------------------------------------------------------- data


def sample(args, data_dir: str) -> dict:
  """Samples the policy once (``samples_{train,eval}.jsonl`` in ``data_dir``, with the settings
  in ``samples_meta.json``); a later call with the same settings reads them back."""
  # pylint: disable=import-outside-toplevel
  from postrl.data.verifier import ScoredSample
  settings = dict(model=args.model, task=TASK, num_prompts=args.num_prompts,
                  num_eval_prompts=args.num_eval_prompts, num_samples=args.num_samples,
                  max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed,
                  train_seed=0, eval_seed=1234, reward="graded", sample_batch_size=64)
  meta_path = os.path.join(data_dir, "samples_meta.json")
  paths = {split: os.path.join(data_dir, f"samples_{split}.jsonl") for split in ("train", "eval")}
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    if meta["settings"] != settings:
      raise SystemExit(f"{meta_path}: the samples there were made with other settings; use "
                       f"another --out or delete {data_dir}")
    print(f"reusing the samples in {data_dir}")
  else:
    meta = _sample_now(args, settings, paths)  # the meta file, written last, marks them done
    common.write_json(meta_path, meta, indent=1)
  out = {"meta": meta}
  for split, path in paths.items():
    groups = collections.OrderedDict()
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        groups.setdefault(row["prompt"], []).append(ScoredSample(**row))
    out[split] = list(groups.values())
  return out


def _sample_now(args, settings: dict, paths: dict) -> dict:
  # pylint: disable=import-outside-toplevel
  import time
  import jax
  import ml_collections
  from postrl.data.preference import verifier_reward
  from postrl.data.verifier import reward_stats, sample_and_score
  from postrl.models import load_pretrained, load_tokenizer
  from postrl.trainers import common
  t0 = time.perf_counter()
  task = ml_collections.ConfigDict(TASK)
  eval_problems = _unique(common.task_problems(task, args.num_eval_prompts, 1234))
  train_problems = _unique(common.held_out_train_problems(task, args.num_prompts, 0,
                                                          eval_problems))
  model = load_pretrained(args.model, param_dtype="float32", dtype="float32")
  tokenizer = load_tokenizer(args.model)
  reward_fn = verifier_reward("arithmetic", "graded")
  os.makedirs(os.path.dirname(paths["train"]), exist_ok=True)
  meta = dict(settings=settings)
  for split, problems, seed in (("train", train_problems, args.seed),
                                ("eval", eval_problems, args.seed + 1)):
    samples = sample_and_score(model, tokenizer, problems, reward_fn,
                               num_samples=args.num_samples, key=jax.random.key(seed),
                               max_new_tokens=args.max_new_tokens, temperature=1.0,
                               batch_size=64)
    with open(paths[split], "w") as f:
      for group in samples:
        for s in group:
          f.write(json.dumps(dict(prompt=s.prompt, completion=s.completion, reward=s.reward,
                                  num_tokens=s.num_tokens, finished=s.finished)) + "\n")
    meta[split] = dict(num_prompts=len(problems), reward_stats=reward_stats(samples))
  meta["sampling_seconds"] = round(time.perf_counter() - t0, 1)
  return meta


def data_stats(groups) -> dict:
  """Distinct reward levels per prompt (histogram), the fraction of right answers, the longest
  completion (tokens)."""
  levels = collections.Counter(_num_levels(g) for g in groups)
  flat = [s for g in groups for s in g]
  return dict(num_prompts=len(groups), levels_histogram={n: levels[n] for n in sorted(levels)},
              correct_fraction=sum(s.reward > 0.9 for s in flat) / max(len(flat), 1),
              finished_fraction=sum(s.finished for s in flat) / max(len(flat), 1),
              max_tokens=max((s.num_tokens for s in flat), default=0))


def prompts_with_levels(stats: dict, k: int) -> int:
  return sum(n for levels, n in stats["levels_histogram"].items() if levels >= k)


def choose_ks(stats: dict, *, min_train: int, min_eval: int) -> list[int]:
  """``--ks auto``: the first of (2, 4, 8), (2, 4, 6), (2, 3, 4) whose largest K leaves at least
  ``min_train`` training and ``min_eval`` held-out rankings."""
  for ks in ((2, 4, 8), (2, 4, 6), (2, 3, 4)):
    if (prompts_with_levels(stats["train"], ks[-1]) >= min_train
        and prompts_with_levels(stats["eval"], ks[-1]) >= min_eval):
      return list(ks)
  raise SystemExit(f"too few prompts with 4 distinct reward levels: {json.dumps(stats)}")


def write_rankings(samples: dict, k_max: int, seed: int, data_dir: str) -> dict[str, int]:
  """``{train,eval}_k{k_max}.jsonl``: rankings of ``k_max`` (``postrl.data.verifier.rankings``)
  of the cached samples; returns their counts."""
  # pylint: disable-next=import-outside-toplevel
  from postrl.data.records import write_jsonl
  from postrl.data.verifier import rankings  # pylint: disable=import-outside-toplevel
  counts = {}
  for split, split_seed in (("train", seed), ("eval", seed + 1)):
    ranked = rankings(samples[split], k=k_max, seed=split_seed)
    write_jsonl(os.path.join(data_dir, f"{split}_k{k_max}.jsonl"), ranked)
    counts[split] = len(ranked)
  return counts


def _unique(problems):
  seen, out = set(), []
  for p in problems:
    if p.prompt not in seen:
      seen.add(p.prompt)
      out.append(p)
  return out


def _num_levels(group, min_gap: float = 1e-6) -> int:
  """Distinct reward levels among a prompt's distinct completions (as ``rankings`` counts)."""
  levels = sorted({s.reward for s in group}, reverse=True)
  n = 1 if levels else 0
  for a, b in zip(levels, levels[1:]):
    n += a - b >= min_gap
  return n


def subset_rankings(records, k: int, seed: int):
  """From each ranking, the responses at the first ``k`` positions of a random permutation of
  its positions (``seed`` and the record's index), kept in ranked order: nested over ``k``."""
  out = []
  for i, r in enumerate(records):
    order = list(range(len(r.responses)))
    random.Random(f"{seed}-{i}").shuffle(order)
    keep = sorted(order[:k])
    out.append(type(r)(prompt=r.prompt, responses=tuple(r.responses[j] for j in keep)))
  return out


def training_files(data_dir: str, ks, seed: int) -> dict[int, str]:
  """``{K: path}`` of the training rankings of each K (derived from the K_max file)."""
  # pylint: disable-next=import-outside-toplevel
  from postrl.data.records import read_jsonl, write_jsonl
  k_max = max(ks)
  full, _ = read_jsonl(os.path.join(data_dir, f"train_k{k_max}.jsonl"), "ranking")
  paths = {}
  for k in ks:
    path = os.path.join(data_dir, f"train_k{k}_of_{k_max}.jsonl")
    write_jsonl(path, full if k == k_max else subset_rankings(full, k, seed))
    paths[k] = path
  return paths


# -------------------------------------------------------------------------------------- runs


def run_one(name: str, k: int, loss: str, args, train_path: str, eval_path: str,
            before: bool) -> str:
  workdir = os.path.join(args.out, name)
  flags = ["--config", "configs/rm_arith.py", f"--config.model={args.model}",
           f"--config.loss.name={loss}", "--config.data.kind=rankings",
           "--config.data.reward=graded", f"--config.data.k={k}",
           f"--config.data.path={train_path}", f"--config.data.eval_path={eval_path}",
           f"--config.steps={args.steps}", f"--config.batch_size={args.batch_size}",
           f"--config.seq_len={args.seq_len}", f"--config.seed={args.seed}",
           f"--config.optim.lr={args.lr}", f"--config.eval.before={before}",
           "--config.save_model=False", f"--config.checkpoint.every={args.steps}", *args.extra]
  if not common.reuse(name, workdir, flags):
    common.launch(name, [sys.executable, os.path.join(ROOT, "launch.py"), "--workdir", workdir,
                         *flags], ROOT)
  return workdir


def read_run(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  keys = ("pair_accuracy", "top1_accuracy", "order_accuracy")
  return dict({f"{key}_{when}": r.get(f"{key}_{when}") for key in keys
               for when in ("before", "after")},
              seconds_per_step=r.get("seconds_per_step"), seconds=r.get("seconds"),
              first_loss=r.get("first_loss"), last_loss=r.get("last_loss"),
              num_train_records=r.get("num_train_records"),
              num_eval_records=r.get("num_eval_records"), train_k=r.get("train_k"),
              eval_k=r.get("eval_k"), num_truncated=r.get("num_truncated"))


def per_ranking(path: str) -> dict:
  """Per held-out ranking: ordered pairs scored right, pairs, top-1 and full-order hits (strict
  inequalities, as ``postrl.data.preference.pairwise_accuracy`` / ``listwise_accuracy``)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  with np.load(path) as f:
    s, m = f["scores"].astype(np.float64), f["mask"] > 0
  K = s.shape[1]
  above = np.triu(np.ones((K, K), bool), 1)[None] & m[:, :, None] & m[:, None, :]
  right = above & (s[:, :, None] > s[:, None, :])
  top1 = [bool(np.all(row[v][0] > row[v][1:])) for row, v in zip(s, m)]
  order = [bool(np.all(np.diff(row[v]) < 0)) for row, v in zip(s, m)]
  return dict(pairs_right=right.sum((1, 2)), pairs=above.sum((1, 2)), top1=np.array(top1),
              order=np.array(order))


def bootstrap(per: dict, *, samples: int = 5000, seed: int = 0) -> dict:
  """90% intervals of each run's held-out pairwise and top-1 accuracy, and of the paired
  differences that the ablation asks about, from resampling the held-out rankings (the same
  resampled rankings for every run)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  n = len(next(iter(per.values()))["top1"])
  idx = np.random.default_rng(seed).integers(0, n, (samples, n))
  draws = {name: dict(pair=p["pairs_right"][idx].sum(1) / p["pairs"][idx].sum(1),
                      top1=p["top1"][idx].mean(1)) for name, p in per.items()}
  ci = lambda x: [float(np.percentile(x, 5)), float(np.percentile(x, 95))]  # noqa: E731
  out = {"runs": {name: {key: ci(v) for key, v in d.items()} for name, d in draws.items()},
         "differences": {}}
  names = [name for name in per if name != "untrained"]
  k_of = lambda name: int(name.split("_")[0][1:])  # noqa: E731
  for a in names:      # PL - BT at each K; a larger K - a smaller K (same loss, or K = 2)
    for b in names:
      same_loss = a[-3:] == b[-3:] or k_of(b) == 2
      if (k_of(a) == k_of(b) and a.endswith("_pl") and b.endswith("_bt")) or (
          same_loss and k_of(a) > k_of(b)):
        key = f"{a} - {b}"
        out["differences"][key] = {
            m: dict(mean=float((draws[a][m] - draws[b][m]).mean()),
                    ci=ci(draws[a][m] - draws[b][m]),
                    p_above_0=float((draws[a][m] - draws[b][m] > 0).mean()),
                    p_below_0=float((draws[a][m] - draws[b][m] < 0).mean()))
            for m in ("pair", "top1")}
  return out


def plan(ks) -> list[tuple[str, int, str]]:
  """(name, K, loss) of every run: one run at K = 2 (BT == PL there), both losses above."""
  out = []
  for k in sorted(ks):
    for loss in (("bradley_terry",) if k == 2 else LOSSES):
      out.append((f"k{k}_{'bt' if loss == 'bradley_terry' else 'pl'}", k, loss))
  return out


# ------------------------------------------------------------------------------------ report


def table(results: dict, eval_k: int, n_eval: int, boot: dict) -> str:
  pairs = n_eval * math.comb(eval_k, 2)
  ci = lambda name, key: "[{:.0f}, {:.0f}]".format(  # noqa: E731
      *(100 * v for v in boot["runs"][name][key]))
  lines = [f"| K | loss | held-out pairwise acc. (of {pairs} pairs) [90% CI] | top-1 (of {n_eval}) "
           f"[90% CI] | full order (of {n_eval}) | s/step (median) | run (min) |",
           "|---|---|---|---|---|---|---|"]
  first = next(iter(results.values()))
  lines.append(f"| - | untrained head | {_pct(first['pair_accuracy_before'], pairs)} "
               f"{ci('untrained', 'pair')} | {_pct(first['top1_accuracy_before'], n_eval)} "
               f"{ci('untrained', 'top1')} | {_pct(first['order_accuracy_before'], n_eval)} | | |")
  for name, r in results.items():
    loss = "BT = PL" if r["train_k"] == 2 else ("BT (all pairs)" if name.endswith("bt") else "PL")
    sps = f"{r['seconds_per_step']:.1f}" if r["seconds_per_step"] else ""
    lines.append(f"| {r['train_k']} | {loss} | {_pct(r['pair_accuracy_after'], pairs)} "
                 f"{ci(name, 'pair')} | {_pct(r['top1_accuracy_after'], n_eval)} "
                 f"{ci(name, 'top1')} | {_pct(r['order_accuracy_after'], n_eval)} | {sps} | "
                 f"{r['seconds'] / 60:.1f} |")
  return "\n".join(lines)


def differences_table(boot: dict) -> str:
  lines = ["| paired difference (same held-out rankings) | pairwise acc. (points) [90% CI] | "
           "P(> 0) / P(< 0) | top-1 (points) [90% CI] | P(> 0) / P(< 0) |",
           "|---|---|---|---|---|"]
  for key, d in boot["differences"].items():
    cells = []
    for m in ("pair", "top1"):
      lo, hi = (100 * v for v in d[m]["ci"])
      cells += [f"{100 * d[m]['mean']:+.1f} [{lo:+.1f}, {hi:+.1f}]",
                f"{d[m]['p_above_0']:.2f} / {d[m]['p_below_0']:.2f}"]
    lines.append(f"| {key} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _pct(value, n: int) -> str:
  if value is None:
    return ""
  return f"{100 * value:.1f}% ({round(value * n)})"


def plot(results: dict, path: str, eval_k: int) -> None:
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(10, 3.8), layout="constrained")
  axes = fig.subplots(1, 2)
  first = next(iter(results.values()))
  n_eval = first["num_eval_records"]
  fig.suptitle(f"reward models trained on rankings of K, evaluated on the same {n_eval} held-out "
               f"rankings of {eval_k}")
  for ax, key, title, chance in (
      (axes[0], "pair_accuracy", f"pairwise accuracy (all {math.comb(eval_k, 2)} pairs)", 0.5),
      (axes[1], "top1_accuracy", "top-1 accuracy (the best scores highest)", 1 / eval_k)):
    for loss, marker in (("bt", "o"), ("pl", "s")):
      points = sorted((r["train_k"], r[f"{key}_after"]) for name, r in results.items()
                      if name.endswith(loss) or r["train_k"] == 2)
      ax.plot([k for k, _ in points], [100 * v for _, v in points], marker=marker,
              label="Bradley-Terry (all pairs)" if loss == "bt" else "Plackett-Luce")
    if first[f"{key}_before"] is not None:
      ax.axhline(100 * first[f"{key}_before"], color="tab:gray", ls="--", label="untrained head")
    ax.axhline(100 * chance, color="black", ls=":", lw=0.8, label="chance")
    ax.set(xlabel="K (responses per training ranking)", ylabel="held-out (%)", title=title)
    ax.set_xticks(sorted({r["train_k"] for r in results.values()}))
  axes[0].legend()
  fig.savefig(path, dpi=120)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ks", default="2,4,8",
                      help="K values (the largest is the held-out K), or 'auto' (choose_ks)")
  parser.add_argument("--min_train", type=int, default=32,
                      help="--ks auto: training rankings of the largest K at least")
  parser.add_argument("--min_eval", type=int, default=16,
                      help="--ks auto: held-out rankings of the largest K at least")
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--batch_size", type=int, default=4, help="rankings per step")
  parser.add_argument("--seq_len", type=int, default=80)
  parser.add_argument("--lr", type=float, default=1e-5)
  parser.add_argument("--num_prompts", type=int, default=96)
  parser.add_argument("--num_eval_prompts", type=int, default=48)
  parser.add_argument("--num_samples", type=int, default=8)
  parser.add_argument("--max_new_tokens", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--model", default="smollm2-135m-instruct")
  parser.add_argument("--out", default=os.path.join(ROOT, "runs", "reward_models"))
  parser.add_argument("--sample_only", action="store_true",
                      help="sample, print the statistics, write the rankings, stop")
  parser.add_argument("--extra", action="append", default=[],
                      help="more launch.py flags for every run, e.g. --extra=--config.seed=1")
  args = parser.parse_args(argv)
  # every flag is checked before the (long) sampling
  common.check_at_least(parser, 1, steps=args.steps, batch_size=args.batch_size,
                        seq_len=args.seq_len, num_prompts=args.num_prompts,
                        num_eval_prompts=args.num_eval_prompts,
                        max_new_tokens=args.max_new_tokens,
                        min_train=args.min_train, min_eval=args.min_eval)
  if not (math.isfinite(args.lr) and args.lr > 0):
    parser.error(f"--lr must be a positive number, got {args.lr}")
  if args.ks != "auto":
    ks = sorted(set(common.int_list(parser, "ks", args.ks, minimum=2)))
    if not ks:
      parser.error("--ks: give K values >= 2 (or 'auto')")
  common.check_at_least(parser, 2 if args.ks == "auto" else max(ks),
                        num_samples=args.num_samples)  # a ranking of K needs K samples
  common.check_out(parser, args.out)
  data_dir = os.path.join(args.out, "data")
  samples = sample(args, data_dir)
  stats = {split: data_stats(samples[split]) for split in ("train", "eval")}
  for split in ("train", "eval"):
    print(f"{split}: {stats[split]['num_prompts']} prompts; distinct reward levels per prompt "
          f"{stats[split]['levels_histogram']}; right answers "
          f"{stats[split]['correct_fraction']:.1%}", flush=True)
  if args.ks == "auto":
    ks = choose_ks(stats, min_train=args.min_train, min_eval=args.min_eval)
    print(f"--ks auto: K = {ks}")
  k_max = max(ks)
  counts = write_rankings(samples, k_max, args.seed, data_dir)
  print(f"rankings of K={k_max}: {counts['train']} train, {counts['eval']} held-out", flush=True)
  common.write_json(os.path.join(data_dir, "choice.json"), dict(ks=ks, rankings=counts))
  if counts["train"] < args.batch_size or not counts["eval"]:
    raise SystemExit(f"too few rankings of K={k_max}: lower the largest K or sample more prompts")
  if args.sample_only:
    return
  train_paths = training_files(data_dir, ks, args.seed)
  eval_path = os.path.join(data_dir, f"eval_k{k_max}.jsonl")
  results, per = {}, {}
  for i, (name, k, loss) in enumerate(plan(ks)):
    workdir = run_one(name, k, loss, args, train_paths[k], eval_path, before=i == 0)
    results[name] = read_run(workdir)
    per[name] = per_ranking(os.path.join(workdir, "eval", f"scores_step{args.steps}.npz"))
    if i == 0:
      per["untrained"] = per_ranking(os.path.join(workdir, "eval", "scores_step0.npz"))
  boot = bootstrap(per)
  common.write_json(os.path.join(args.out, "summary.json"),
                    dict(ks=ks, rankings=counts, data=samples["meta"], stats=stats, runs=results,
                         bootstrap=boot), indent=1)
  print(table(results, k_max, counts["eval"], boot))
  print()
  print(differences_table(boot))
  path = os.path.join(args.out, "reward_models.png")
  plot(results, path, k_max)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
