#!/usr/bin/env bash
# The K2 experiment log's fair A/B (sections 4, 12-14) on the GPU: the preset (configs/experiment/k2_ab.yaml), the
# quality and the speed profile on the same protocol, then parse_metrics.py --compare of each against the preset.
#   bash commands_gpu/k2_ab.sh --20 --100 [--embedded] [--dry-run] [key=value ...]
source "$(dirname "$0")/../scripts/suite.sh" && suite_k2_ab gpu "$@"
