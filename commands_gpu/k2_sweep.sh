#!/usr/bin/env bash
# The K2 experiment log's section-4 grid on the GPU: the preset and the grid of configs/experiment/k2_sweep.yaml (one
# Hydra multirun) on images 0-19, then parse_metrics.py --compare of every job against the preset.
#   bash commands_gpu/k2_sweep.sh --20 [--embedded] [--dry-run] [key=value ...]
source "$(dirname "$0")/../scripts/suite.sh" && suite_k2_sweep gpu "$@"
