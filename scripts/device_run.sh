# Shared by the device drivers (scripts/*_device.sh), sourced: their arguments and one timed run, if selected.
#   device_args "$@"                 # SAVE_DIR N_IMAGES [BATCH_SIZE=100] [RUNS=all] -> SAVE N BS RUNS; GPU, PY
#   device_run NAME LABEL COMMAND...
#   device_selected NAME              # whether RUNS selects NAME (to skip a run's preparation as well)
# runs COMMAND when RUNS (space separated) holds "all", NAME's prefix before the first "_" (the prior) or NAME; its
# console output goes to $SAVE/LABEL.txt, "LABEL rc=<code> wall_sec=<s>" to stdout and $SAVE/walltimes.txt.
device_selected() {  # device_selected NAME: true when RUNS selects NAME
    case " $RUNS " in *" all "*|*" ${1%%_*} "*|*" $1 "*) return 0 ;; *) return 1 ;; esac
}

device_run() {
    local name=$1 label=$2; shift 2
    device_selected "$name" || return 0
    echo "+ $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    "$@" > "$SAVE/$label.txt" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    tail -n 2 "$SAVE/$label.txt"
    echo "$label rc=$rc wall_sec=$(awk "BEGIN{printf \"%.1f\", $t1 - $t0}")" | tee -a "$SAVE/walltimes.txt"
}

device_args() {
    local usage="usage: $(basename "$0") SAVE_DIR N_IMAGES [BATCH_SIZE] [RUNS]"
    SAVE=${1:?$usage}
    N=${2:?$usage}
    BS=${3:-100}
    RUNS=${4:-all}
    GPU=${GPU:-0}
    PY=${PY:-python3}
    mkdir -p "$SAVE"
}
