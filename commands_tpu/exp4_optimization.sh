#!/usr/bin/env bash
# Exp 4 (plan): Exp 2, and hard data consistency from t = 200 on, on the TPU.
# Settings: configs/experiment/exp4_optimization.yaml; arguments and environment: scripts/suite.sh.
#   bash commands_tpu/exp4_optimization.sh --1 --10 --100 [--embedded] [--dry-run] [key=value ...]
source "$(dirname "$0")/../scripts/suite.sh" && suite exp4_optimization tpu "1 10 100" "$@"
