"""The tests' persistent compilation cache: one folder per pytest-xdist worker.

JAX writes a cache entry in place (``LRUCache.put``: ``write_bytes``, no lock while eviction is
off, as here), so a process reading an entry that another is still writing can load a truncated
executable; with one folder per worker only that worker, and the subprocesses it waits for,
write and read each entry. Subprocesses of a test get ``JAX_CACHE_DIR`` through
``JAX_COMPILATION_CACHE_DIR``."""

import os

JAX_CACHE_DIR = os.path.join(os.path.expanduser("~/.cache/postrl-jax-tests"),
                             os.environ.get("PYTEST_XDIST_WORKER", "main"))
