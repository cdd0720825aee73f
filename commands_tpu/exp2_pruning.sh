#!/usr/bin/env bash
# Exp 2 (plan): Exp 1, then 4 -> 2 particles at t = 200 (diversity-aware pruning), on the TPU.
# Settings: configs/experiment/exp2_pruning.yaml; arguments and environment: scripts/suite.sh.
#   bash commands_tpu/exp2_pruning.sh --1 --10 --100 [--embedded] [--dry-run] [key=value ...]
source "$(dirname "$0")/../scripts/suite.sh" && suite exp2_pruning tpu "1 10 100" "$@"
