# The experiment suite's shared part, sourced by commands_gpu/*.sh and commands_tpu/*.sh (one line each): argument
# parsing, the prior, and one posterior_sample.py command per image count. A script only names its experiment config;
# every hyperparameter lives in configs/experiment/<exp>.yaml.
#
#   suite EXP DEVICE SIZES "$@"     # DEVICE gpu|tpu; SIZES the allowed counts, e.g. "1 10 100"
#   suite_final DEVICE "$@"         # Exp 5: --imagenet / --ffhq instead of counts (100 images each)
#   suite_k2_ab DEVICE "$@"         # the K2 log's A/B: baseline, k2_quality, k2_speed on --20 / --100, then --compare
#   suite_k2_sweep DEVICE "$@"      # the K2 log's section-4 grid (one multirun) on --20, then --compare with the baseline
#
# Arguments: --1 / --10 / --100 (any combination, run in increasing order), --embedded (the embedded Fashion-MNIST
# latent prior, or the pixel one for the K2 scripts, instead of the official checkpoints: no downloads), --dry-run
# (print the commands only), and Hydra overrides (anything with "="), passed through to every command. Anything else is
# refused. Environment: SUITE_PRIOR (one of SUITE_PRIORS; default imagenet-ldm, the plan's, for Exp 0-4, the dataset's
# LDM for Exp 5, ffhq-pixel for the K2 scripts, the log's), PY
# (python3), SAVE_DIR (results). Results: $SAVE_DIR/<exp>_<N>[_<prior>][_tpu]/.

SUITE_PRIORS="imagenet-ldm ffhq-ldm ffhq-pixel imagenet-pixel fmnist-ldm fmnist-pixel"

suite_groups() {  # suite_groups PRIOR: data, model, sampler and task group of a prior
    case $1 in
        imagenet-ldm) echo "+data=test-imagenet +model=imagenet256ldm +sampler=latent_edm_daps task_group=ldm" ;;
        ffhq-ldm) echo "+data=test-ffhq +model=ffhq256ldm +sampler=latent_edm_daps task_group=ldm" ;;
        ffhq-pixel) echo "+data=test-ffhq +model=ffhq256ddpm +sampler=edm_daps task_group=pixel_hmc" ;;
        imagenet-pixel) echo "+data=test-imagenet +model=imagenet256ddpm +sampler=edm_daps task_group=pixel" ;;
        fmnist-ldm) echo "+data=test-fmnist +model=fmnist32ldm +sampler=latent_edm_daps task_group=fmnist_ldm" ;;
        fmnist-pixel) echo "+data=test-fmnist +model=fmnist32ddpm +sampler=edm_daps task_group=fmnist_pixel" ;;
        *) return 1 ;;
    esac
}

suite_usage() {  # suite_usage SCRIPT FLAGS...: the usage text
    local script=$1; shift
    echo "usage: bash $script [$(echo "$@" | sed 's/ /] [/g')] [--embedded] [--dry-run] [hydra overrides ...]"
    for flag in "$@"; do
        case $flag in
            --1) echo "  --1        : 1 image sanity check" ;;
            --10) echo "  --10       : 10 images main experiment" ;;
            --100) echo "  --100      : 100 images final eval" ;;
            --imagenet) echo "  --imagenet : ImageNet 100 images (the ImageNet LDM)" ;;
            --ffhq) echo "  --ffhq     : FFHQ 100 images (the FFHQ LDM)" ;;
            --20) echo "  --20       : images 0-19 (the K2 log's slice)" ;;
        esac
    done
    echo "  --embedded : the embedded Fashion-MNIST prior (test-fmnist, no downloads); SUITE_PRIOR picks others"
    echo "               ($SUITE_PRIORS)"
    echo "  --dry-run  : print the commands, run nothing"
    echo "  key=value  : Hydra overrides passed to every run (e.g. batch_size=10 gpu=1)"
}

suite_parse() {  # suite_parse SCRIPT "FLAGS" DEFAULT ARGS...: sets SUITE_CHOSEN, SUITE_OVERRIDES, SUITE_DRY, SUITE_PRIOR
    local script=$1 flags=$2 default=$3; shift 3
    SUITE_CHOSEN=() SUITE_OVERRIDES=() SUITE_DRY=0
    SUITE_PRIOR=${SUITE_PRIOR:-$default}
    if [ $# -eq 0 ]; then
        suite_usage "$script" $flags
        exit 0
    fi
    local arg
    for arg in "$@"; do
        case $arg in
            --embedded) SUITE_PRIOR=fmnist-${default#*-} ;;
            --dry-run) SUITE_DRY=1 ;;
            --*) if [[ " $flags " == *" $arg "* ]]; then
                     SUITE_CHOSEN+=("$arg")
                 else
                     echo "$script: unknown argument $arg" >&2
                     suite_usage "$script" $flags >&2
                     exit 2
                 fi ;;
            *=*) SUITE_OVERRIDES+=("$arg") ;;
            *) echo "$script: unknown argument $arg (Hydra overrides are key=value)" >&2
               suite_usage "$script" $flags >&2
               exit 2 ;;
        esac
    done
    if ! { [ "$SUITE_PRIOR" = dataset-ldm ] && [ "$default" = dataset-ldm ]; } && ! suite_groups "$SUITE_PRIOR" > /dev/null
    then
        echo "$script: SUITE_PRIOR=$SUITE_PRIOR is not one of: $SUITE_PRIORS" >&2
        exit 2
    fi
    if [ ${#SUITE_CHOSEN[@]} -eq 0 ]; then
        echo "$script: choose at least one of $flags" >&2
        suite_usage "$script" $flags >&2
        exit 2
    fi
}

suite_exec() {  # suite_exec NAME ARGS...: print the command; run it unless --dry-run; stop the suite if it fails
    local name=$1; shift
    local cmd=("${PY:-python3}" posterior_sample.py "$@" "save_dir=${SAVE_DIR:-results}" "name=$name"
               "${SUITE_OVERRIDES[@]}")
    local shown
    shown=$(printf '%q ' "${cmd[@]}")
    echo "+ ${shown% }"
    [ "$SUITE_DRY" = 1 ] && return 0
    local rc=0
    (cd "$SUITE_ROOT" && "${cmd[@]}") || rc=$?
    if [ "$rc" != 0 ]; then
        echo "suite: $name failed (exit $rc); the runs before it are kept" >&2
        exit "$rc"
    fi
}

suite_name() {  # suite_name BASE PRIOR DEFAULT DEVICE: BASE, _PRIOR when not the DEFAULT prior, and _tpu on the TPU
    local name=$1
    [ "$2" != "$3" ] && name="${name}_$2"
    [ "$4" = tpu ] && name="${name}_tpu"
    echo "$name"
}

suite_device() {  # suite_device DEVICE: the device override
    [ "$1" = tpu ] && echo "use_tpu=true" || echo "use_tpu=false"
}

SUITE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

suite() {  # suite EXP DEVICE "SIZES" ARGS...
    local exp=$1 device=$2 sizes=$3; shift 3
    local flags="" n
    for n in $sizes; do flags="$flags --$n"; done
    suite_parse "$(basename "$0")" "${flags# }" imagenet-ldm "$@"
    for n in $sizes; do  # increasing order, whatever the order given
        [[ " ${SUITE_CHOSEN[*]} " == *" --$n "* ]] || continue
        # shellcheck disable=SC2046
        suite_exec "$(suite_name "${exp}_${n}" "$SUITE_PRIOR" imagenet-ldm "$device")" $(suite_groups "$SUITE_PRIOR") +task=phase_retrieval \
            "+experiment=$exp" data.start_id=0 "data.end_id=$n" "$(suite_device "$device")"
    done
}

suite_final() {  # suite_final DEVICE ARGS...: Exp 5 on 100 images of each dataset chosen; a prior set by SUITE_PRIOR
    local device=$1; shift  # or --embedded has its own data: one run, whatever the flags
    suite_parse "$(basename "$0")" "--imagenet --ffhq" dataset-ldm "$@"
    local flag prior default base
    for flag in --imagenet --ffhq; do
        [[ " ${SUITE_CHOSEN[*]} " == *" $flag "* ]] || continue
        [ "$flag" = --imagenet ] && default=imagenet-ldm || default=ffhq-ldm
        prior=$SUITE_PRIOR base="exp5_final_${flag#--}"
        if [ "$prior" = dataset-ldm ]; then
            prior=$default  # the dataset flag picks its LDM
        else
            base=exp5_final
        fi
        # shellcheck disable=SC2046
        suite_exec "$(suite_name "$base" "$prior" "$default" "$device")" $(suite_groups "$prior") \
            +task=phase_retrieval +experiment=exp5_final data.start_id=0 data.end_id=100 "$(suite_device "$device")"
        if [ "$base" = exp5_final ]; then
            break
        fi
    done
}

suite_compare() {  # suite_compare BASE NEW ARGS...: the K2 log's verdict (parse_metrics.py --compare) into NEW_compare.md
    local out="${SAVE_DIR:-results}/$2_compare.md"
    local cmd=("${PY:-python3}" scripts/parse_metrics.py --compare "${SAVE_DIR:-results}/$1" "${SAVE_DIR:-results}/$2"
               --format md "${@:3}")
    local shown
    shown=$(printf '%q ' "${cmd[@]}")
    echo "+ ${shown}> $out"
    [ "$SUITE_DRY" = 1 ] && return 0
    local rc=0
    (cd "$SUITE_ROOT" && "${cmd[@]}" > "$out") || rc=$?
    if [ "$rc" != 0 ]; then
        echo "suite: the comparison $1 vs $2 failed (exit $rc); the runs are kept" >&2
        exit "$rc"
    fi
}

suite_k2_ab() {  # suite_k2_ab DEVICE ARGS...: baseline (k2_ab), k2_ab_quality, k2_ab_speed, and both against the baseline
    local device=$1 n run base
    shift
    suite_parse "$(basename "$0")" "--20 --100" ffhq-pixel "$@"
    for n in 20 100; do
        [[ " ${SUITE_CHOSEN[*]} " == *" --$n "* ]] || continue
        for run in k2_ab k2_ab_quality k2_ab_speed; do
            # shellcheck disable=SC2046
            suite_exec "$(suite_name "${run}_${n}" "$SUITE_PRIOR" ffhq-pixel "$device")" $(suite_groups "$SUITE_PRIOR") \
                +task=phase_retrieval "+experiment=$run" data.start_id=0 "data.end_id=$n" "$(suite_device "$device")"
        done
        base=$(suite_name "k2_ab_${n}" "$SUITE_PRIOR" ffhq-pixel "$device")
        for run in k2_ab_quality k2_ab_speed; do
            suite_compare "$base" "$(suite_name "${run}_${n}" "$SUITE_PRIOR" ffhq-pixel "$device")"
        done
    done
}

suite_k2_sweep() {  # suite_k2_sweep DEVICE ARGS...: the baseline and the grid (one multirun) on 20 images, compared
    local device=$1 base grid
    shift
    suite_parse "$(basename "$0")" "--20" ffhq-pixel "$@"
    base=$(suite_name k2_ab_20 "$SUITE_PRIOR" ffhq-pixel "$device")
    grid=$(suite_name k2_sweep_20 "$SUITE_PRIOR" ffhq-pixel "$device")
    # shellcheck disable=SC2046  # resume=true: the baseline of an earlier k2_ab.sh --20 is kept, not sampled again
    suite_exec "$base" $(suite_groups "$SUITE_PRIOR") +task=phase_retrieval +experiment=k2_ab data.start_id=0 \
        data.end_id=20 "$(suite_device "$device")" resume=true
    # shellcheck disable=SC2046
    suite_exec "$grid" -m $(suite_groups "$SUITE_PRIOR") +task=phase_retrieval +experiment=k2_sweep data.start_id=0 \
        data.end_id=20 "$(suite_device "$device")"
    suite_compare "$base" "$grid" --metrics psnr
}

