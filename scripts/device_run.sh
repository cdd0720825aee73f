# Shared by the device drivers (scripts/*_device.sh), sourced: one timed run, if selected.
#   device_run NAME LABEL COMMAND...
# runs COMMAND when RUNS (space separated) holds "all", NAME's prefix before the first "_" (the prior) or NAME; its
# console output goes to $SAVE/LABEL.txt, "LABEL rc=<code> wall_sec=<s>" to stdout and $SAVE/walltimes.txt.
device_run() {
    local name=$1 label=$2; shift 2
    case " $RUNS " in *" all "*|*" ${name%%_*} "*|*" $name "*) ;; *) return 0 ;; esac
    echo "+ $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    "$@" > "$SAVE/$label.txt" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    tail -n 2 "$SAVE/$label.txt"
    echo "$label rc=$rc wall_sec=$(awk "BEGIN{printf \"%.1f\", $t1 - $t0}")" | tee -a "$SAVE/walltimes.txt"
}
