#!/bin/bash
# benchmarks/snapshot_run.sh SCRIPT.py [flags]: run a benchmark script against a snapshot of the committed
# mskd_tf/ (git archive of HEAD, or of $MSKD_LIBRARY_COMMIT), so that edits made while a long run is going can
# neither change the code under measurement nor break it mid-run (autograph re-reads a function's source file
# when it traces it).
set -e
cd "$(dirname "$0")/.."
export MSKD_LIBRARY_COMMIT="$(git rev-parse --short "${MSKD_LIBRARY_COMMIT:-HEAD}")"
snapshot="${TMPDIR:-/tmp}/mskd_tf_snapshot_$MSKD_LIBRARY_COMMIT"
if [ ! -d "$snapshot/mskd_tf" ]; then
  mkdir -p "$snapshot" && git archive "$MSKD_LIBRARY_COMMIT" mskd_tf | tar -x -C "$snapshot"
fi
script="$1"; shift
PYTHONPATH="$snapshot" exec .venv/bin/python "benchmarks/$script" "$@"
