#!/usr/bin/env bash
# Tuning and sanity runs of the embedded Fashion-MNIST priors: test-fmnist images [0, N), 4 particles each.
#   bash scripts/bench_fmnist.sh [N=10] [SAVE=results/bench_fmnist] [GPU=0]
# Each configuration gets its own folder (sweeps: <name>/run<NNN>/, whose config.yaml holds the values); every step is capped (SIGINT keeps the partial metrics); the table at the
# end comes from scripts/parse_metrics.py.
set -u
N=${1:-10}; SAVE=${2:-results/bench_fmnist}; GPU=${3:-0}; CAP=${CAP:-150}
PY=${PY:-python3}
COMMON="+data=test-fmnist data.end_id=$N num_samples=4 batch_size=10 show_progress=false gpu=$GPU save_dir=$SAVE overwrite=true"
PIXEL="+model=fmnist32ddpm +sampler=edm_daps"
LATENT="+model=fmnist32ldm +sampler=latent_edm_daps"
run() { timeout -s INT "$CAP" $PY posterior_sample.py "$@" || echo "step ended with $?: $*"; }
# Phase retrieval, pixel prior: the official groups, step-size sweep of pixel_hmc, MALA
run -m $COMMON $PIXEL +task=phase_retrieval task_group=pixel_hmc name=pr_px_hmc_lr_sweep \
    task.pixel_hmc.mcmc_sampler_config.lr=3e-6,9.75e-6,3e-5
run $COMMON $PIXEL +task=phase_retrieval task_group=pixel name=pr_px_langevin_official
run $COMMON $PIXEL +task=phase_retrieval task_group=pixel_hmc task.pixel_hmc.mcmc_sampler_config.mc_algo=mala \
    task.pixel_hmc.mcmc_sampler_config.lr=1e-5 name=pr_px_mala_lr1e-5
# Phase retrieval, latent prior: step-size sweep of the official ldm group
run -m $COMMON $LATENT +task=phase_retrieval task_group=ldm name=pr_ldm_lr_sweep \
    task.ldm.mcmc_sampler_config.lr=7e-6,2.1e-5,6e-5
# Sanity: box inpainting (a 12x12 hole) with both priors, official groups
run $COMMON $PIXEL +task=inpainting task_group=pixel_hmc 'task.pixel_hmc.operator.mask_len_range=[12,13]' name=inp_px_hmc
run $COMMON $LATENT +task=inpainting task_group=ldm 'task.ldm.operator.mask_len_range=[12,13]' name=inp_ldm
$PY scripts/parse_metrics.py "$SAVE"/*
