#!/bin/bash
# Reruns the CIFAR-10 accuracy benchmark: benchmarks/mskd_cifar.sh [--quick] [flags of mskd_cifar.py]
# The library is imported from a snapshot of the committed mskd_tf/ (git archive HEAD), so that edits made
# while a long run is going can neither change the code under measurement nor break it mid-run
# (autograph re-reads a function's source file when it traces it).
set -e
cd "$(dirname "$0")/.."
snapshot="${TMPDIR:-/tmp}/mskd_tf_snapshot_$(git rev-parse --short HEAD)"
if [ ! -d "$snapshot/mskd_tf" ]; then
  mkdir -p "$snapshot" && git archive HEAD mskd_tf | tar -x -C "$snapshot"
fi
PYTHONPATH="$snapshot" exec .venv/bin/python benchmarks/mskd_cifar.py "$@"
