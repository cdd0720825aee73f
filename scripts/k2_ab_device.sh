#!/usr/bin/env bash
# K2 fair A/B on the embedded Fashion-MNIST priors (issue 11; K2 experiment log sections 4, 12-14):
# baseline vs +experiment=k2_quality vs +experiment=k2_speed, with and without early stop, for the pixel prior
# (fmnist32ddpm, task_group=fmnist_pixel) and the latent prior (fmnist32ldm, task_group=fmnist_ldm), phase retrieval
# on test-fmnist images [0, N), 4 particles per image.
#
#   bash scripts/k2_ab_device.sh SAVE_DIR N_IMAGES [BATCH_SIZE=100] [RUNS=all]
#
# RUNS picks runs by name (space separated, e.g. "px_baseline px_speed"), or "all", "px" (the five pixel runs),
# "ldm" (the five latent runs). GPU (default 0) and PY (default python3) come from the environment.
#
# The log's fixed settings for every run: Euler PF-ODE with 5 steps, 200 annealing levels (for the latent prior too,
# whose sampler preset has 50 levels and 2 ODE steps), 4 particles per measurement, the same batch_size for every
# run, save_traj=false. min_sigma=0.05 comes from the k2 profiles. K2's sigma is the median over the measurements
# of a batch, so the batch size is part of the setting: compare only runs of one batch size.
#
# Each run writes SAVE_DIR/<name>/ (posterior_sample.py) and SAVE_DIR/<name>.txt (its console output); a line
# "<name> rc=<code> wall_sec=<s>" per run goes to stdout and SAVE_DIR/walltimes.txt. The command lines below are
# the ones run (printed before each run with its variables expanded).
set -u
source "$(dirname "$0")/device_run.sh"
device_args "$@"

run() {  # run NAME COMMAND...: device_run with the log k2ab_NAME
    local name=$1; shift
    device_run "$name" "k2ab_$name" "$@"
}

# Pixel prior (DAPS, fmnist_pixel)
run px_baseline $PY posterior_sample.py +data=test-fmnist +model=fmnist32ddpm +task=phase_retrieval +sampler=edm_daps task_group=fmnist_pixel sampler.k2_scheduler_config=null num_samples=4 +sampler.diffusion_scheduler_config.solver=euler sampler.diffusion_scheduler_config.num_steps=5 sampler.annealing_scheduler_config.num_steps=200 data.start_id=0 data.end_id=$N batch_size=$BS save_traj=false show_progress=false gpu=$GPU save_dir=$SAVE name=k2ab_px_baseline
run px_quality $PY posterior_sample.py +data=test-fmnist +model=fmnist32ddpm +task=phase_retrieval +sampler=edm_daps task_group=fmnist_pixel +experiment=k2_quality +sampler.diffusion_scheduler_config.solver=euler sampler.diffusion_scheduler_config.num_steps=5 sampler.annealing_scheduler_config.num_steps=200 data.start_id=0 data.end_id=$N batch_size=$BS save_traj=false show_progress=false gpu=$GPU save_dir=$SAVE name=k2ab_px_quality
run px_quality_noes $PY posterior_sample.py +data=test-fmnist +model=fmnist32ddpm +task=phase_retrieval +sampler=edm_daps task_group=fmnist_pixel +experiment=k2_quality ++sampler.k2_scheduler_config.early_stop=false +sampler.diffusion_scheduler_config.solver=euler sampler.diffusion_scheduler_config.num_steps=5 sampler.annealing_scheduler_config.num_steps=200 data.start_id=0 data.end_id=$N batch_size=$BS save_traj=false show_progress=false gpu=$GPU save_dir=$SAVE name=k2ab_px_quality_noes
run px_speed $PY posterior_sample.py +data=test-fmnist +model=fmnist32ddpm +task=phase_retrieval +sampler=edm_daps task_group=fmnist_pixel +experiment=k2_speed +sampler.diffusion_scheduler_config.solver=euler sampler.diffusion_scheduler_config.num_steps=5 sampler.annealing_scheduler_config.num_steps=200 data.start_id=0 data.end_id=$N batch_size=$BS save_traj=false show_progress=false gpu=$GPU save_dir=$SAVE name=k2ab_px_speed
run px_speed_noes $PY posterior_sample.py +data=test-fmnist +model=fmnist32ddpm +task=phase_retrieval +sampler=edm_daps task_group=fmnist_pixel +experiment=k2_speed ++sampler.k2_scheduler_config.early_stop=false +sampler.diffusion_scheduler_config.solver=euler sampler.diffusion_scheduler_config.num_steps=5 sampler.annealing_scheduler_config.num_steps=200 data.start_id=0 data.end_id=$N batch_size=$BS save_traj=false show_progress=false gpu=$GPU save_dir=$SAVE name=k2ab_px_speed_noes

# Latent prior (LatentDAPS, fmnist_ldm)
run ldm_baseline $PY posterior_sample.py +data=test-fmnist +model=fmnist32ldm +task=phase_retrieval +sampler=latent_edm_daps task_group=fmnist_ldm sampler.k2_scheduler_config=null num_samples=4 +sampler.diffusion_scheduler_config.solver=euler sampler.diffusion_scheduler_config.num_steps=5 sampler.annealing_scheduler_config.num_steps=200 data.start_id=0 data.end_id=$N batch_size=$BS save_traj=false show_progress=false gpu=$GPU save_dir=$SAVE name=k2ab_ldm_baseline
run ldm_quality $PY posterior_sample.py +data=test-fmnist +model=fmnist32ldm +task=phase_retrieval +sampler=latent_edm_daps task_group=fmnist_ldm +experiment=k2_quality +sampler.diffusion_scheduler_config.solver=euler sampler.diffusion_scheduler_config.num_steps=5 sampler.annealing_scheduler_config.num_steps=200 data.start_id=0 data.end_id=$N batch_size=$BS save_traj=false show_progress=false gpu=$GPU save_dir=$SAVE name=k2ab_ldm_quality
run ldm_quality_noes $PY posterior_sample.py +data=test-fmnist +model=fmnist32ldm +task=phase_retrieval +sampler=latent_edm_daps task_group=fmnist_ldm +experiment=k2_quality ++sampler.k2_scheduler_config.early_stop=false +sampler.diffusion_scheduler_config.solver=euler sampler.diffusion_scheduler_config.num_steps=5 sampler.annealing_scheduler_config.num_steps=200 data.start_id=0 data.end_id=$N batch_size=$BS save_traj=false show_progress=false gpu=$GPU save_dir=$SAVE name=k2ab_ldm_quality_noes
run ldm_speed $PY posterior_sample.py +data=test-fmnist +model=fmnist32ldm +task=phase_retrieval +sampler=latent_edm_daps task_group=fmnist_ldm +experiment=k2_speed +sampler.diffusion_scheduler_config.solver=euler sampler.diffusion_scheduler_config.num_steps=5 sampler.annealing_scheduler_config.num_steps=200 data.start_id=0 data.end_id=$N batch_size=$BS save_traj=false show_progress=false gpu=$GPU save_dir=$SAVE name=k2ab_ldm_speed
run ldm_speed_noes $PY posterior_sample.py +data=test-fmnist +model=fmnist32ldm +task=phase_retrieval +sampler=latent_edm_daps task_group=fmnist_ldm +experiment=k2_speed ++sampler.k2_scheduler_config.early_stop=false +sampler.diffusion_scheduler_config.solver=euler sampler.diffusion_scheduler_config.num_steps=5 sampler.annealing_scheduler_config.num_steps=200 data.start_id=0 data.end_id=$N batch_size=$BS save_traj=false show_progress=false gpu=$GPU save_dir=$SAVE name=k2ab_ldm_speed_noes
