#!/bin/bash
# Reruns the CIFAR-10 accuracy benchmark: benchmarks/mskd_cifar.sh [--quick] [flags of mskd_cifar.py]
# against a snapshot of the committed library (see snapshot_run.sh).
exec "$(dirname "$0")/snapshot_run.sh" mskd_cifar.py "$@"
