#!/usr/bin/env bash
# Speed measurements of issue 15 on one GPU: the levers alone, a profile of one level, and the whole sampler
# against an older commit, on the embedded Fashion-MNIST priors (4 particles per image, phase retrieval):
#   micro       scripts/bench_noise.py and scripts/bench_pr_gradient.py at Fashion-MNIST (400 x 1 x 32 x 32) and
#               FFHQ (40 x 3 x 256 x 256) sizes
#   profile     scripts/profile_level.py, pixel prior, 100 images (400 particles), noise=generator and counter-fused
#   px_base     scripts/bench_daps.py, pixel prior, 20 images in one batch, 200 levels: BASE_CODE (A) against this
#               checkout with FAST (B)
#   ldm_base    the same on the latent prior (50 levels)
#   px_noise    this checkout, pixel prior, 20 images: noise=generator (A) against FAST (B)
#   px_bf16     this checkout, pixel prior: FAST (A) against FAST + the UNet in bf16, channels_last, compiled (B):
#               the same random numbers, so the pair is the fast networks' quality check (EVAL="[psnr,ssim,lpips]")
#   ldm_bf16    the same on the latent prior (the UNet and the decoder in bf16, channels_last, compiled)
#   ldm_fp16    the same in float16 (10 mantissa bits, as TF32, against bfloat16's 7; range up to 65504)
#   px_fp32c    the control of px_bf16: FAST (A) against FAST + the UNet compiled in float32 (B), the same random
#               numbers: how far rounding alone moves the metrics (B without channels_last, as run in session 3)
#   ldm_fp32c   the same on the latent prior, B with channels_last (the decoder's layout rewrite) as in ldm_bf16's B:
#               the pair differs from ldm_bf16 in the dtype only
#   nets_adm    scripts/bench_unet.py, the ffhq256 ADM's UNet at batch 40 (random weights): fp32, bf16, channels_last,
#               cudnn.benchmark, compiled (NET_VARIANTS picks some)
#   nets_ldm    the same for the LDM-FFHQ UNet and its decoder's forward and backward, batch 10 (NET_PROFILE=1: and a
#               profile of each, with the tensor copies by operator and layout)
#   adm_base    DAPS-1K pixel_hmc with the ffhq256 ADM architecture (random weights, scripts/make_random_model.py),
#               the 10 demo-natural images x num_samples=4 in one batch (the issue's target setting): BASE_CODE
#               against FAST; about 240 s per baseline run on an H100, so REPEATS=1 fits one device call
#   ckpt_adm    adm_base's workload, this checkout with FAST on both sides: checkpoint_every_sec=0 (the chunk saved after
#               every level, as before) (A) against the default interval (B)
#   ldm256_base LatentDAPS `ldm` with the LDM-FFHQ architecture (random weights), 10 demo-natural images x 1 in one
#               batch (N_IMAGES and BATCH_SIZE do not apply to these two: their sizes are the issue's; before
#               session 3, 2 images x 4)
#   profile_adm scripts/profile_level.py of level 1 of 3 of adm_base's workload, fp32 eager with generator noise
#               and with FAST, then FAST once more in a second process (the compile from inductor's on-disk cache)
#   profile_ldm the same for ldm256_base's workload
#   gn          scripts/bench_group_norm.py: torch's group norm against cores.layout's in a compiled block, at the
#               ADM's and the LDM-FFHQ decoder's sizes, forward and forward + backward
#   mcmc_level  scripts/bench_mcmc_level.py: one MCMC level as the sampler runs it (host enqueue, wall) against its
#               CUDA-graph replay, at the ADM's (40 x 3 x 256 x 256, 62 hmc steps) and Fashion-MNIST's (400 x 1 x 32 x 32,
#               100 steps) sizes
#   startup     where a process's time before the run's clock goes: `python -X importtime` of posterior_sample, and
#               cProfile of adm_base's B side for one level (STARTUP_EXTRA: more overrides, e.g. the compile)
#   adm_e2e     the issue's end-to-end row: adm_base's workload with 1 particle per image (10 x 1), this checkout with
#               FAST only, REPEATS runs each in its own process (on a fresh machine the first compiles into inductor's
#               empty cache)
#   adm_sweep   adm_base's workload (10 x 4), this checkout with FAST only, each of REPEATS runs one sweep over SWEEP
#               (default "seed=1,2,3") in one process
#   floor       scripts/startup_floor.py on the GPU: what a process pays before a run's own work (the interpreter,
#               torch, the device ready, this repository's imports, diffusers' UNet module)
#
#   BASE_CODE=DIR bash scripts/speed_device.sh SAVE_DIR N_IMAGES [BATCH_SIZE=20] [RUNS=all]
#
# BASE_CODE is a `git archive` of the baseline commit with checkpoints and dataset linked in (bench_daps.py --a-code).
# FAST (default "noise=counter-fused") is side B's overrides; REPEATS (default 2) the alternations of bench_daps.py;
# EVAL the Fashion-MNIST runs' eval_fn_list (default [psnr]); SPEED_OVERRIDES extra Hydra overrides of every run
# (a CPU smoke test: "gpu=-1 sampler.annealing_scheduler_config.num_steps=2").
# Each measurement writes SAVE_DIR/<name>.txt (and bench_daps.py's SAVE_DIR/<name>.json); "<name> rc wall_sec" goes
# to stdout and SAVE_DIR/walltimes.txt.
set -u
source "$(dirname "$0")/device_run.sh"
device_args "$1" "$2" "${3:-20}" "${4:-all}"
FAST=${FAST:-noise=counter-fused}
half() { echo "model.dtype=$1 +model.channels_last=true model.compile=default"; }  # half DTYPE: the fast networks
REPEATS=${REPEATS:-2}
PIXEL="+model=fmnist32ddpm +sampler=edm_daps task_group=fmnist_pixel"
LATENT="+model=fmnist32ldm +sampler=latent_edm_daps task_group=fmnist_ldm"
COMMON="+data=test-fmnist +task=phase_retrieval data.end_id=$N batch_size=$BS num_samples=4 gpu=$GPU \
eval_fn_list=${EVAL:-[psnr]} save_samples=false ${SPEED_OVERRIDES:-}"

device_run micro micro_noise_fmnist $PY scripts/bench_noise.py --batch 400 --shape 1 32 32
device_run micro micro_noise_ffhq $PY scripts/bench_noise.py --batch 40 --shape 3 256 256
device_run micro micro_grad_fmnist $PY scripts/bench_pr_gradient.py --batch 400 --size 32 --channels 1
device_run micro micro_grad_ffhq $PY scripts/bench_pr_gradient.py --batch 40 --size 256 --channels 3
for noise in generator counter-fused; do
    # shellcheck disable=SC2086
    device_run profile "profile_$noise" $PY scripts/profile_level.py -- $COMMON $PIXEL data.end_id=100 batch_size=100 \
        sampler.annealing_scheduler_config.num_steps=3 noise=$noise save_dir="$SAVE/profile" name=$noise
done
flat_metrics() {  # flat_metrics NAME: each run's metrics.json as $SAVE/NAME_<side>_metrics.json (for parse_metrics.py)
    local m
    for m in "$SAVE/$1"/*/run/metrics.json; do
        [ -f "$m" ] && cp "$m" "$SAVE/$1_$(basename "$(dirname "$(dirname "$m")")")_metrics.json"
    done
}
bench() {  # bench NAME GROUPS [bench_daps.py options]: one A/B pair of sides
    local name=$1 groups=$2; shift 2
    device_run "$name" "$name" $PY scripts/bench_daps.py --repeats "$REPEATS" --save "$SAVE/$name" \
        --json "$SAVE/$name.json" --common "$COMMON $groups" "$@"
    flat_metrics "$name"
}
bench px_base "$PIXEL" --a-code "${BASE_CODE:-.}" --b "$FAST"
bench ldm_base "$LATENT" --a-code "${BASE_CODE:-.}" --b "$FAST"
bench px_noise "$PIXEL" --a noise=generator --b "$FAST"
bench px_bf16 "$PIXEL" --a "$FAST" --b "$FAST $(half bfloat16)"
bench ldm_bf16 "$LATENT" --a "$FAST" --b "$FAST $(half bfloat16)"
bench ldm_fp16 "$LATENT" --a "$FAST" --b "$FAST $(half float16)"
bench px_fp32c "$PIXEL" --a "$FAST" --b "$FAST model.compile=default"
bench ldm_fp32c "$LATENT" --a "$FAST" --b "$FAST +model.channels_last=true model.compile=default"
random_model() {  # random_model MODEL: configs/model/MODEL.yaml's architecture with random weights in $SAVE/rand/MODEL
    [ -d "$SAVE/rand/$1" ] || $PY scripts/make_random_model.py --config "configs/model/$1.yaml" --out "$SAVE/rand/$1" \
        > "$SAVE/rand_$1.txt" 2>&1
}
nets() {  # nets NAME MODEL BATCH [GFLOP]: scripts/bench_unet.py's variants (NET_VARIANTS, default all)
    local name=$1 model=$2 batch=$3
    device_selected "$name" || return 0
    random_model "$model"
    # shellcheck disable=SC2086
    device_run "$name" "$name" $PY scripts/bench_unet.py --model "$SAVE/rand/$model" --batch "$batch" \
        ${4:+--gflop $4} ${NET_VARIANTS:+--variants $NET_VARIANTS} ${NET_PROFILE:+--profile}
}
nets nets_adm ffhq256ddpm 40 388
nets nets_ldm ffhq256ldm 10
device_run gn gn $PY scripts/bench_group_norm.py
device_run mcmc_level mcmc_level_adm $PY scripts/bench_mcmc_level.py
device_run mcmc_level mcmc_level_fmnist $PY scripts/bench_mcmc_level.py --shape 400 1 32 32 --steps 100
natural_run() {  # natural_run MODEL SAMPLER_GROUPS IMAGES SAMPLES: the overrides of a 256 px run (random weights)
    echo "+data=demo-natural +task=phase_retrieval +model.name=diffusers +model.path=$SAVE/rand/$1 $2 data.end_id=$3 \
batch_size=$3 num_samples=$4 gpu=$GPU eval_fn_list=[psnr] save_samples=false"
}
natural() {  # natural NAME MODEL SAMPLER_GROUPS IMAGES SAMPLES [bench_daps.py options]: a 256 px architecture with
    local name=$1 model=$2 groups=$3 images=$4 samples=$5   # random weights, BASE_CODE against FAST
    shift 5
    device_selected "$name" || return 0
    random_model "$model"
    device_run "$name" "$name" $PY scripts/bench_daps.py --repeats "$REPEATS" --save "$SAVE/$name" \
        --json "$SAVE/$name.json" --a-code "${BASE_CODE:-.}" --b "$FAST" \
        --common "$(natural_run "$model" "$groups" "$images" "$samples") ${SPEED_OVERRIDES:-}" "$@"
    flat_metrics "$name"
}
ADM="+sampler=edm_daps task_group=pixel_hmc +sampler.diffusion_scheduler_config.solver=euler"
LDM="+sampler=latent_edm_daps task_group=ldm"
natural adm_base ffhq256ddpm "$ADM" 10 4
natural ldm256_base ffhq256ldm "$LDM" 10 1
natural adm_e2e ffhq256ddpm "$ADM" 10 1 --sides B
natural adm_sweep ffhq256ddpm "$ADM" 10 4 --sides B --sweep "${SWEEP:-seed=1,2,3}"
if device_selected ckpt_adm; then
    random_model ffhq256ddpm
    device_run ckpt_adm ckpt_adm $PY scripts/bench_daps.py --repeats "$REPEATS" --save "$SAVE/ckpt_adm" \
        --json "$SAVE/ckpt_adm.json" --a "$FAST checkpoint_every_sec=0" --b "$FAST" \
        --common "$(natural_run ffhq256ddpm "$ADM" 10 4) ${SPEED_OVERRIDES:-}"
fi
level_profile() {  # level_profile NAME MODEL SAMPLER_GROUPS IMAGES SAMPLES: profile_level.py of level 1 of 3, fp32
    local name=$1 model=$2 run side   # eager with generator noise ("eager"), with FAST ("fast"); PROFILE_SIDES picks
    device_selected "$name" || return 0   # (default both)
    random_model "$model"
    run="$(natural_run "$model" "$3" "$4" "$5") sampler.annealing_scheduler_config.num_steps=3 save_dir=$SAVE/$name"
    for side in ${PROFILE_SIDES:-eager fast}; do
        local extra="noise=generator"
        [ "$side" = fast ] && extra=$FAST
        # shellcheck disable=SC2086
        device_run "$name" "${name}_$side" $PY scripts/profile_level.py --top 15 -- $run name=$side $extra \
            ${SPEED_OVERRIDES:-}
    done
    # a second process of the fast side (AGAIN=0: none): its compile reads what the first left in inductor's cache
    [ "${AGAIN:-1}" = 0 ] && return 0
    case " ${PROFILE_SIDES:-eager fast} " in *" fast "*) ;; *) return 0 ;; esac
    # shellcheck disable=SC2086
    device_run "$name" "${name}_fast_again" $PY posterior_sample.py $run name=fast_again $FAST ${SPEED_OVERRIDES:-}
}
level_profile profile_adm ffhq256ddpm "$ADM" 10 4
level_profile profile_ldm ffhq256ldm "$LDM" 10 1
startup() {  # the imports (-X importtime, the 25 slowest) and a cProfile of one level of adm_base's B side
    device_selected startup || return 0
    random_model ffhq256ddpm
    device_run startup startup_imports $PY -X importtime -c "import posterior_sample"
    sort -t'|' -k2 -n "$SAVE/startup_imports.txt" | tail -n 25 > "$SAVE/startup_imports_top.txt"
    # shellcheck disable=SC2086
    device_run startup startup_adm $PY -m cProfile -o "$SAVE/startup_adm.prof" posterior_sample.py \
        $(natural_run ffhq256ddpm "$ADM" 10 4) sampler.annealing_scheduler_config.num_steps=1 save_dir="$SAVE/startup" \
        name=startup $FAST ${STARTUP_EXTRA:-} ${SPEED_OVERRIDES:-}
    $PY -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('cumulative').print_stats(70)" \
        "$SAVE/startup_adm.prof" > "$SAVE/startup_adm_stats.txt" 2>&1
}
startup
device_run floor startup_floor $PY scripts/startup_floor.py --device "cuda:$GPU" --repeats 3
