#!/usr/bin/env bash
# Runs a DDP test (default tests/test_reliability.py::test_ddp_two_processes_match_one_process;
# TEST=<pytest id> picks another) N times (default 20) and counts failures; each failing run's output is kept in $LOGDIR/fail-<i>.txt.
# Usage: VENV=<venv> LOAD=2 benchmarks/ddp_exit_stress.sh [N] [repo]     (load the cores yourself beside it to test under load,
#        e.g. LOAD=2 starts two busy loops for the duration and stops them at the end)
N=${1:-20}
REPO=${2:-$(cd "$(dirname "$0")/.." && pwd)}
LOGDIR=${LOGDIR:-results/ddp_exit_stress}
mkdir -p "$LOGDIR"
[ -n "$VENV" ] && source "$VENV/bin/activate"
cd "$REPO" || exit 2
pids=()
for _ in $(seq 1 "${LOAD:-0}"); do ( while :; do :; done ) & pids+=($!); done
fails=0
for i in $(seq 1 "$N"); do
  start=$(date +%s)
  if OMP_NUM_THREADS=1 python -m pytest -q -x -p no:cacheprovider \
      "${TEST:-tests/test_reliability.py::test_ddp_two_processes_match_one_process}" > "$LOGDIR/run-$i.txt" 2>&1; then
    echo "run $i: pass ($(( $(date +%s) - start )) s, load $(cut -d' ' -f1 /proc/loadavg))"
    rm -f "$LOGDIR/run-$i.txt"
  else
    fails=$((fails + 1))
    mv "$LOGDIR/run-$i.txt" "$LOGDIR/fail-$i.txt"
    echo "run $i: FAIL ($(( $(date +%s) - start )) s) -> $LOGDIR/fail-$i.txt"
  fi
done
for p in "${pids[@]}"; do kill "$p"; done
echo "$fails failures in $N runs"
[ "$fails" -eq 0 ]
