"""The benchmark commands prepared for a GPU lease parse: every ``python3 benchmarks/X.py ...`` line
of ``benchmarks/gpu_*.sh`` and every ``python benchmarks/X.py ...`` command in the device-call
table of ``benchmarks/README.md`` is handed to its script's own argument parser (stopped right
after parsing, so nothing runs). A misspelt flag or a value outside its choices fails here instead
of in the first seconds of a lent GPU's time."""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# shell loop variables of the scripts, set to values the loops take
LOOP_VALUES = {"model": "smollm2-135m", "top_p": "0.9", "LIMIT": "40", "name": "run",
               "OUT": "/tmp/out", "m": "16", "variants": "4:dot:prmt:nk 8:dot:shift:nk",
               "LOG": "/tmp/out/log", "left": "200", "limit": "185", "sweep_s": "170",
               "MODELS": "smollm2-135m llama-1b", "GEN_LIMIT": "90"}
# run a benchmark script with argparse stopped after a successful parse (exit 0) or a failed one
# (argparse's own exit 2 with its message)
RUNNER = """
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_then_stop(self, *a, **k):
  parse(self, *a, **k)
  print("parsed", flush=True)
  raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_then_stop
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _expand(command: str) -> list:
  """Shell words of one command line with the scripts' parameter expansions resolved: ${V:-d} -> d
  (split into words when unquoted), $V -> LOOP_VALUES[V], "$@" and redirections dropped."""
  command = re.split(r"\s(?:2>&1|\||\d?>)", command)[0]
  command = command.replace('"$@"', "")
  command = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", command)
  command = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: LOOP_VALUES[m.group(1) or m.group(2)],
                   command)
  return shlex.split(command)


def _commands():
  found = []
  for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "gpu*.sh"))):
    with open(path) as f:
      text = f.read().replace("\\\n", " ")
    for line in re.findall(r"python3 (benchmarks/\w+\.py[^\n]*)", text):
      found.append((os.path.basename(path), line))
  with open(os.path.join(ROOT, "benchmarks", "README.md")) as f:
    readme = f.read()
  for line in re.findall(r"`python3? (benchmarks/\w+\.py[^`]*)`", readme):
    found.append(("README.md", line))
  # `[VAR=...] bash benchmarks/X.sh ARGS`: ARGS go where the script's python line has "$@"
  for script, extra in re.findall(r"`(?:\w+=\S+ )*bash (benchmarks/gpu\w*\.sh)([^`]*)`", readme):
    with open(os.path.join(ROOT, script)) as f:
      text = f.read().replace("\\\n", " ")
    for line in re.findall(r"python3 (benchmarks/\w+\.py[^\n]*)", text):
      if '"$@"' in line and extra.strip():
        found.append((f"README.md {os.path.basename(script)}", line.replace('"$@"', extra)))
  return found


COMMANDS = _commands()


def test_the_prepared_commands_are_found():
  sources = {source for source, _ in COMMANDS}
  assert {"gpu_qmm_layouts.sh", "gpu_qmm_profile.sh", "gpu_sampling_then_qmm.sh",
          "gpu_lease.sh", "README.md"} <= sources
  assert len(COMMANDS) >= 8


@pytest.mark.parametrize("source,command", COMMANDS,
                         ids=[f"{s}:{c.split()[0]}:{i}" for i, (s, c) in enumerate(COMMANDS)])
def test_prepared_benchmark_command_parses(source, command):
  words = _expand(command)
  proc = subprocess.run([sys.executable, "-c", RUNNER, *words], cwd=ROOT, capture_output=True,
                        text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0 and "parsed" in proc.stdout, (
      f"{source}: {' '.join(words)}\n{proc.stderr[-2000:]}")


def test_a_misspelt_flag_fails_the_parse():
  """The check can fail: an unknown flag and a value outside a flag's choices."""
  for words in (["benchmarks/quantized_matmul.py", "--variant-sets", "layouts"],
                ["benchmarks/quantized_matmul.py", "--check-layouts", "kn", "knn"]):
    proc = subprocess.run([sys.executable, "-c", RUNNER, *words], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2 and "parsed" not in proc.stdout, proc.stderr[-500:]
