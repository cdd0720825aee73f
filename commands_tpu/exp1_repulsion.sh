#!/usr/bin/env bash
# Exp 1 (plan): 4 particles with repulsion (particle guidance) until t = 200, on the TPU.
# Settings: configs/experiment/exp1_repulsion.yaml; arguments and environment: scripts/suite.sh.
#   bash commands_tpu/exp1_repulsion.sh --1 --10 --100 [--embedded] [--dry-run] [key=value ...]
source "$(dirname "$0")/../scripts/suite.sh" && suite exp1_repulsion tpu "1 10 100" "$@"
