#!/usr/bin/env bash
# Exp 5 (plan): the best setting on 100 images of ImageNet and / or FFHQ, on the GPU.
# Settings: configs/experiment/exp5_final.yaml; arguments and environment: scripts/suite.sh.
#   bash commands_gpu/exp5_final.sh --imagenet --ffhq [--embedded] [--dry-run] [key=value ...]
source "$(dirname "$0")/../scripts/suite.sh" && suite_final gpu "$@"
