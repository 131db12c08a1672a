"""The tests' persistent compilation cache, for the subprocesses a test starts (``launch.py`` runs,
benchmark scripts): a fresh folder per test run and pytest-xdist worker.

The pytest processes themselves do not use it (``tests/conftest.py``). Two clean-clone runs on
the 2-core machine (2026-11-27) lost a worker to a segmentation fault inside XLA, each in a test
that loads a program an earlier test of the same worker had written to the cache, and each passed
when run alone with the same cache; JAX's own tracker has reports of deserialised CPU executables
crashing (e.g. jax-ml/jax#38445 for rejected entries; a deep recursion in LLVM ORC while loading
an entry with thousands of kernels, reported elsewhere). Subprocesses of one test still share
one folder: a resumed run loads what the first run compiled (the SIGTERM and resume tests), and
the folder is new for every test run, so no entry from another code version or an interrupted
run is ever read. Subprocesses get it through ``JAX_COMPILATION_CACHE_DIR``.

A likelier cause of those crashes was found on 2026-11-28: a worker that keeps every compiled
program reaches ~60,000 memory maps by the end of a run, near Linux's 65,530 per process.
``tests/conftest.py`` now frees the programs after each test module and whenever a worker's maps
pass 20,000."""

import os
import tempfile

_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", f"pid{os.getpid()}")
JAX_CACHE_DIR = os.path.join(tempfile.gettempdir(), "postrl-jax-tests", _RUN,
                             os.environ.get("PYTEST_XDIST_WORKER", "main"))
