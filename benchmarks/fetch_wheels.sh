#!/usr/bin/env bash
# Run on a machine with the internet, before a device call that needs them:
#
#   bash benchmarks/fetch_wheels.sh        # -> .whl/ (1.8 MB, git-ignored: name ".whl" in carry)
#
# The GPU image cannot reach a package index and lacks ml_collections (postrl.trainers imports it)
# and TRL with its dependencies datasets, dill and multiprocess; benchmarks/gpu.sh installs what
# .whl/ holds. multiprocess ships one wheel per Python: the GPU image runs Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl ml_collections==1.1.0 trl==1.16.0 datasets==4.8.5 \
  dill==0.4.0
python3 -m pip download -q --no-deps -d .whl --python-version 3.12 --only-binary=:all: \
  multiprocess==0.70.18
ls .whl
