#!/bin/bash
# benchmarks/selection_signals.sh [flags of selection_signals.py], against a snapshot of the committed library.
exec "$(dirname "$0")/snapshot_run.sh" selection_signals.py "$@"
