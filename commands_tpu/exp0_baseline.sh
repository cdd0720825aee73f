#!/usr/bin/env bash
# Exp 0 (plan): 4 independent particles, the DAPS "4 runs" baseline, on the TPU.
# Settings: configs/experiment/exp0_baseline.yaml; arguments and environment: scripts/suite.sh.
#   bash commands_tpu/exp0_baseline.sh --1 --10 --100 [--embedded] [--dry-run] [key=value ...]
source "$(dirname "$0")/../scripts/suite.sh" && suite exp0_baseline tpu "1 10 100" "$@"
