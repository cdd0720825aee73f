#!/usr/bin/env bash
# Exp 3 (plan): 2 particles from the start (no 1-image run: a success rate needs images), on the GPU.
# Settings: configs/experiment/exp3_2particle.yaml; arguments and environment: scripts/suite.sh.
#   bash commands_gpu/exp3_2particle.sh --10 --100 [--embedded] [--dry-run] [key=value ...]
source "$(dirname "$0")/../scripts/suite.sh" && suite exp3_2particle gpu "10 100" "$@"
