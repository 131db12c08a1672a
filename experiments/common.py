"""What the experiment runners share: their flags are checked before any work, their results are
written atomically, a failed ``launch.py`` run stops them with one line, and a finished run is
reused only with the flags it ran with.

The runners import it as ``experiments.common`` (the repository root is on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import subprocess

RUN_FLAGS = "run_flags.json"  # the launch.py flags of a runner's run, beside its results.json


def out_problem(path: str) -> str | None:
  """Why ``path`` cannot be an output folder, or None: ``launch.workdir_problem``, the check every
  ``launch.py`` run makes of its workdir (the folder is made later, so its nearest existing parent
  counts)."""
  import launch  # pylint: disable=import-outside-toplevel  # light: absl flags, no JAX
  return launch.workdir_problem(path)


def check_out(parser, out: str) -> None:
  """``parser.error`` (exit 2, one line) unless ``--out`` can hold the results."""
  problem = out_problem(out)
  if problem:
    parser.error(f"--out {out}: {problem}")


def check_at_least(parser, minimum: int, **flags) -> None:
  """``parser.error`` for the first flag whose value is below ``minimum``."""
  for name, value in flags.items():
    if value < minimum:
      parser.error(f"--{name} must be at least {minimum}, got {value}")


def int_list(parser, name: str, text: str, *, minimum: int = 1) -> list[int]:
  """"2,4,8" -> [2, 4, 8]; ``parser.error`` on a non-integer or a value below ``minimum``."""
  try:
    values = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    parser.error(f"--{name} must be comma-separated integers, got {text!r}")
  if any(v < minimum for v in values):
    parser.error(f"--{name}: every value must be at least {minimum}, got {text!r}")
  return values


def write_json(path: str, obj, **kwargs) -> None:
  """``json.dump(obj)`` to ``path`` through a temporary file renamed over it: a crash or Ctrl-C
  never leaves half a file (or loses the previous one)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, **kwargs)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def launch(name: str, cmd: list[str], cwd: str) -> None:
  """Runs ``cmd`` (a ``launch.py`` command); SystemExit naming the run if it fails (launch.py has
  printed why)."""
  print(" ".join(cmd), flush=True)
  code = subprocess.run(cmd, cwd=cwd, check=False).returncode
  if code:
    raise SystemExit(f"{name}: launch.py exited with code {code} (its error is above); "
                     f"fix it and run this again (finished runs are reused)")


def reuse(name: str, workdir: str, flags: list[str]) -> bool:
  """Whether ``workdir`` holds a finished run (its ``results.json``) made with ``flags``; records
  ``flags`` there when it does not. A finished run made with other flags (another ``--steps`` or
  ``--extra``) is a SystemExit rather than a silently stale result; runs from before the flags
  were recorded are reused as they are."""
  path = os.path.join(workdir, RUN_FLAGS)
  saved = None
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    except (OSError, ValueError):
      saved = None
  if os.path.exists(os.path.join(workdir, "results.json")):
    if saved is not None and saved != list(flags):
      raise SystemExit(f"{name}: {workdir} holds a run made with other flags; delete it or use "
                       f"another --out.\nsaved: {' '.join(saved)}\nnow:   {' '.join(flags)}")
    print(f"{name}: reusing {workdir}")
    return True
  write_json(path, list(flags))
  return False
