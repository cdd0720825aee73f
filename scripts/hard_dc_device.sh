#!/usr/bin/env bash
# Exp 4 vs Exp 2 on the embedded Fashion-MNIST priors (issue 13): test-fmnist images [0, N), 4 particles per image,
# each prior with its sampler's preset levels (pixel: fmnist32ddpm, 200 levels, task_group=fmnist_pixel; latent:
# fmnist32ldm, 50 levels, task_group=fmnist_ldm), on phase retrieval (pr) and on box inpainting (inp, a 16x16 hole:
# complete measurement information outside it):
#   exp2  +experiment=exp2_pruning        repulsion (scale 1) to t = 200, 4 -> 2 at t = 200
#   exp4  +experiment=exp4_optimization   the same, and hard data consistency from t = 200 on (sampler.hard_dc)
#
#   bash scripts/hard_dc_device.sh SAVE_DIR N_IMAGES [BATCH_SIZE=100] [RUNS=all]
#
# RUNS: "all", a prior ("px", "ldm"), or run names (e.g. "ldm_pr_exp2 ldm_pr_exp4"). GPU and PY from the environment;
# extra Hydra overrides for every run in DC_OVERRIDES (e.g. DC_OVERRIDES="sampler.hard_dc.every=2").
# Each run writes SAVE_DIR/<name>/ and SAVE_DIR/<name>.txt; "<name> rc=<code> wall_sec=<s>" goes to stdout and
# SAVE_DIR/walltimes.txt. The tables: python scripts/dc_report.py SAVE_DIR/<prior>_<task>_exp2 SAVE_DIR/<prior>_<task>_exp4.
set -u
source "$(dirname "$0")/device_run.sh"
device_args "$@"
COMMON="+data=test-fmnist data.start_id=0 data.end_id=$N batch_size=$BS show_progress=false gpu=$GPU save_dir=$SAVE"

run() {  # run NAME: posterior_sample.py for the prior, task and experiment in NAME (<prior>_<task>_<exp>)
    local name=$1 prior task exp
    IFS=_ read -r prior task exp <<< "$name"
    local groups="+model=fmnist32ddpm +sampler=edm_daps task_group=fmnist_pixel"
    [ "$prior" = ldm ] && groups="+model=fmnist32ldm +sampler=latent_edm_daps task_group=fmnist_ldm"
    local op=+task=phase_retrieval
    [ "$task" = inp ] && op=+task=inpainting
    local experiment=+experiment=exp2_pruning
    [ "$exp" = exp4 ] && experiment=+experiment=exp4_optimization
    # shellcheck disable=SC2086
    device_run "$name" "$name" $PY posterior_sample.py $COMMON $groups $op $experiment ${DC_OVERRIDES:-} name="$name"
}

for prior in ldm px; do
    for task in pr inp; do
        run ${prior}_${task}_exp2
        run ${prior}_${task}_exp4
    done
done
