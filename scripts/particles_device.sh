#!/usr/bin/env bash
# Exp 0-3 of the plan on the embedded Fashion-MNIST priors (issue 12): phase retrieval on test-fmnist images [0, N),
# the pixel prior (fmnist32ddpm, task_group=fmnist_pixel) and the latent prior (fmnist32ldm, task_group=fmnist_ldm),
# each with its sampler's preset levels:
#   exp0  4 independent particles           (+experiment=exp0_baseline)
#   exp1  4 particles with repulsion, scale (the force / data-gradient ratio at the first level) 0.3, 1 and 3
#   exp2  exp1 at scale 1, then 4 -> 2 at DDPM t = 200 (+experiment=exp2_pruning)
#   exp3  2 particles from the start, scale 1 (+experiment=exp3_2particle)
#
#   bash scripts/particles_device.sh SAVE_DIR N_IMAGES [BATCH_SIZE=100] [RUNS=all]
#
# RUNS: "all", "px" or "ldm" (one prior), or run names (e.g. "px_exp0 px_exp2"). GPU and PY from the environment.
# Each run writes SAVE_DIR/<name>/ and SAVE_DIR/<name>.txt; "<name> rc=<code> wall_sec=<s>" goes to stdout and
# SAVE_DIR/walltimes.txt. The table: python scripts/parse_metrics.py --modes SAVE_DIR/px_* --split-step 162 (and
# SAVE_DIR/ldm_* --split-step 33; --base RUN for paired differences).
# Measured on one H100 (docs/particles.md), wall seconds per process, start-up and scoring included: px 156-297 (exp0
# 229, exp1 297, exp2 249, exp3 156), ldm 94-117; run-to-run time varies by up to ~25% between device calls. A
# 600-second device call holds two px runs and one ldm run, or five ldm runs.
set -u
source "$(dirname "$0")/device_run.sh"
device_args "$@"
COMMON="+data=test-fmnist +task=phase_retrieval data.start_id=0 data.end_id=$N batch_size=$BS show_progress=false gpu=$GPU save_dir=$SAVE"
PX="+model=fmnist32ddpm +sampler=edm_daps task_group=fmnist_pixel"
LDM="+model=fmnist32ldm +sampler=latent_edm_daps task_group=fmnist_ldm"

run() {  # run NAME OVERRIDES...: posterior_sample.py with the prior of NAME's prefix, if NAME is selected
    local name=$1; shift
    local groups=$PX
    [ "${name%%_*}" = ldm ] && groups=$LDM
    # shellcheck disable=SC2086
    device_run "$name" "$name" $PY posterior_sample.py $COMMON $groups "$@" name="$name"
}

for prior in px ldm; do
    run ${prior}_exp0 +experiment=exp0_baseline
    run ${prior}_exp1_s0.3 +experiment=exp1_repulsion repulsion_scale=0.3
    run ${prior}_exp1_s1 +experiment=exp1_repulsion repulsion_scale=1.0
    run ${prior}_exp1_s3 +experiment=exp1_repulsion repulsion_scale=3.0
    run ${prior}_exp2 +experiment=exp2_pruning repulsion_scale=1.0
    run ${prior}_exp3 +experiment=exp3_2particle repulsion_scale=1.0
done
