#!/usr/bin/env bash
# Exp 0 (plan): 4 independent particles, the DAPS "4 runs" baseline, on the GPU.
# Settings: configs/experiment/exp0_baseline.yaml; arguments and environment: scripts/suite.sh.
#   bash commands_gpu/exp0_baseline.sh --1 --10 --100 [--embedded] [--dry-run] [key=value ...]
source "$(dirname "$0")/../scripts/suite.sh" && suite exp0_baseline gpu "1 10 100" "$@"
