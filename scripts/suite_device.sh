#!/usr/bin/env bash
# The suite's GPU scripts (commands_gpu/) on the embedded Fashion-MNIST priors in one device call, as streams that run
# at the same time: the small priors leave an H100 mostly idle (docs/benchmarks.md), so the times of these runs are
# contended, and each run's start and end go to SAVE_DIR/streams.txt to show with what it overlapped.
#   latent   Exp 0, 1, 2, 3, 4 and Exp 5 (--ffhq) on fmnist-ldm (--embedded)
#   pixel    Exp 0, 1, 2, 3 on fmnist-pixel
#   pixel4   Exp 4 on fmnist-pixel (pixel-space hard data consistency: the longest run)
#
#   bash scripts/suite_device.sh SAVE_DIR SIZE [STREAM ...]      # SIZE 1, 10 or 100; default streams: all three
#
# Extra Hydra overrides of every run in SUITE_EXTRA (default "batch_size=100": one batch); results in SAVE_DIR/<exp>_<N>_
# <prior>/ (SAVE_DIR is the suite's), each run's console in SAVE_DIR/logs/. Then: python scripts/suite_report.py SAVE_DIR.
set -u
SAVE=${1:?usage: suite_device.sh SAVE_DIR SIZE [STREAM ...]}
SIZE=${2:?usage: suite_device.sh SAVE_DIR SIZE [STREAM ...]}
shift 2
STREAMS=${*:-latent pixel pixel4}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
EXTRA=${SUITE_EXTRA-batch_size=100}
export SAVE_DIR=$SAVE
mkdir -p "$SAVE/logs"

one() {  # one PRIOR SCRIPT ARGS...: one suite script, timed, console to logs/<script>_<prior>.txt
    local prior=$1 script=$2; shift 2
    local label="${script}_${prior}" t0 rc
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    SUITE_PRIOR=$prior bash "$ROOT/commands_gpu/$script.sh" "$@" $EXTRA > "$SAVE/logs/$label.txt" 2>&1
    rc=$?
    echo "$label rc=$rc start=$t0 end=$(date +%s.%N)" >> "$SAVE/streams.txt"
}

stream() {  # stream NAME: its runs, one after the other
    case $1 in
        latent)
            for e in exp0_baseline exp1_repulsion exp2_pruning exp3_2particle exp4_optimization; do
                one fmnist-ldm $e "--$SIZE" --embedded
            done
            [ "$SIZE" = 100 ] && one fmnist-ldm exp5_final --ffhq --embedded ;;
        pixel)
            for e in exp0_baseline exp1_repulsion exp2_pruning exp3_2particle; do one fmnist-pixel $e "--$SIZE"; done ;;
        pixel4) one fmnist-pixel exp4_optimization "--$SIZE" ;;
        *) echo "suite_device.sh: unknown stream $1 (latent, pixel, pixel4)" >&2; return 2 ;;
    esac
}

for s in $STREAMS; do stream "$s" & done
wait
cat "$SAVE/streams.txt"
