#!/usr/bin/env bash
# Scaling run on a lent many-core machine (16 cores) where shardpool's dependencies are not
# installed and nothing can be downloaded. Self-contained: installs the wheels carried in .whl/
# (prepared on the development machine, see bench/README.md), then, against one deadline:
#   1. scripts/levelling_scaling.py: the CPU-bound efficiency at 1, 4, 8, 12 and 15 workers with
#      load levelling off and on (pool.rebalance = "off" vs "auto", interleaved; Zipf-skewed
#      channel rates, closed loop; target: efficiency >= 0.85 up to 15 workers with levelling on);
#   2. shardpool bench --workload levelling at 8 workers, phases hot and pause: a channel with
#      40% of the traffic (its worker 90% busy), its neighbours' p99 before and after it is pinned
#      (target >= 5x lower), and the pause per move of 1 and 64 slots;
#   3. scripts/scaling.py for 1, 2, 4, 8, 12 and 15 workers (the real Lightning traffic first:
#      BOLT #2 wire messages with secp256k1 checks; then the synthetic CPU-costed and
#      trivial-handler series) with whatever time is left;
# and leaves in $OUT:
#   levelling-scaling.json  every run of (1), the efficiencies and the target (written after
#                           each run: a run cut short keeps what it measured, "complete": false)
#   levelling-device.json   the report of (2) (written when it ends)
#   scaling-device.json     every point of (3), the ratios and the targets (written after each
#                           point, so a run cut short still leaves what it measured)
#   scaling-device.png      the plot of (3), where matplotlib is installed on the machine
#   scaling-device.log      the whole output
# Budget: everything ends by DEVICE_DEADLINE_S (580 s) after the start, inside a 10-minute slot:
# (1) gets at most 210 s, (2) at most 90 s (skipped with under 60 s left), (3) the rest.
#
# Run from the repository root, with .whl carried:  bash scripts/device_scaling.sh
set -u -o pipefail

OUT="${OUT:-$PWD/results/device}"
mkdir -p "$OUT"
LOG="$OUT/scaling-device.log"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
DEADLINE=${DEVICE_DEADLINE_S:-580}

# Seconds for the next part: at most $1, never past the deadline (minus $2 kept for later parts).
budget() {
  local left=$(( DEADLINE - ($(date +%s) - T0) - ${2:-0} ))
  if (( left < $1 )); then echo "$left"; else echo "$1"; fi
}

{
  echo "== $(date -u +%FT%TZ) $(uname -srm)"
  python3 --version
  echo "cpus: $(nproc) (affinity), $(getconf _NPROCESSORS_ONLN) online"

  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: prepare them first (bench/README.md), and carry .whl" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
  python3 -c 'import zmq, cbor2, xxhash, psutil, multiprocess, dill, coincurve, shardpool;
import shardpool.demo.wire, shardpool.demo.real;
print("pyzmq", zmq.__version__, "| libzmq", zmq.zmq_version(), "| multiprocess",
      multiprocess.__version__, "| psutil", psutil.__version__)' || exit 4
  rc=0

  # (1) Levelling off vs on, CPU-bound (200 us of CPU per message), Zipf s=0.8 over 10,000
  # channels (the static hash leaves the busiest worker 1.1-1.4x the mean at 4-15 workers, and
  # the hottest channel fits in one worker's share, so levelling can reach 1.0): runs of 8 s, the
  # throughput taken over their second half, 2 repeats, 1 worker as the baseline in each.
  # ~200 s on 16 cores. LEVELLING_ARGS / LEVELLING_TIMEOUT_S replace these for a smoke test.
  LARGS=${LEVELLING_ARGS:-"--workers 1 4 8 12 15 --run-seconds 8 --repeats 2 --channels 10000
    --zipf-s 0.8 --message-cost-us 200"}
  t=$(budget "${LEVELLING_TIMEOUT_S:-210}" 120)
  echo "== levelling_scaling.py (at most ${t} s)"
  # shellcheck disable=SC2086  # LARGS is a list of words on purpose
  timeout -k 10 "$t" python3 scripts/levelling_scaling.py $LARGS \
    --out "$OUT/levelling-scaling.json"
  r=$?; echo "== levelling_scaling.py exit code $r"; (( r == 0 )) || rc=$r

  # (2) The hot channel and the pause per move at 8 workers: on 16 cores the hot worker can be
  # kept 90% busy with the front and the other workers beside it (on 2 cores the bench's own
  # front caps it near 60%; the 2-core sweep in bench/README.md shows the neighbours' p99 ratio
  # grows with that load and nears 5x only past 80%).
  HARGS=${HOT_ARGS:-"--workers 8 --phases hot,pause --hot-load 0.9 --run-seconds 6 --repeats 2
    --pause-moves 10"}
  t=$(budget "${HOT_TIMEOUT_S:-90}" 60)
  if (( t >= 60 )) || [[ -n "${HOT_ARGS:-}" ]]; then
    echo "== shardpool bench --workload levelling $HARGS (at most ${t} s)"
    # shellcheck disable=SC2086
    timeout -k 10 "$t" python3 -m shardpool bench --workload levelling $HARGS --json \
      > "$OUT/levelling-device.json"
    r=$?; echo "== levelling bench exit code $r"; (( r == 0 )) || rc=$r
    if (( r == 0 )); then
      python3 -c 'import json, sys
from shardpool.bench.levelling import format_levelling_report
print(format_levelling_report(json.load(open(sys.argv[1]))))' "$OUT/levelling-device.json"
    fi
  else
    echo "== levelling bench skipped: ${t} s left"
  fi

  # (3) The real series first (the figure this machine is for: a node's own work per message, ~100 us
  # on average, against one process doing it serially), the same 40k signed wire messages over
  # 1,000 channels at every worker count (~4 s at 1 worker, plus ~4 s to sign them once and a
  # serial pass per repeat); then the synthetic CPU-costed series (60k messages, ~89 us of busy
  # loop per message) and the trivial one, growing with the worker count (50k messages per worker,
  # at least 200k). ~5 min on 16 cores; if the deadline cuts it short, the JSON keeps every point
  # measured ("complete": false) and the series that came first.
  # SCALING_ARGS / SCALING_TIMEOUT_S replace these for a local smoke test of this script.
  ARGS=${SCALING_ARGS:-"--workers 1 2 4 8 12 15 --series real cpu trivial --real-messages 40000
    --real-channels 1000 --cpu-messages 60000 --cpu-cost-us 500 --messages 200000
    --messages-per-worker 50000 --queue-messages 200000 --repeats 3"}
  t=$(budget "${SCALING_TIMEOUT_S:-540}")
  echo "== scaling.py (at most ${t} s)"
  # shellcheck disable=SC2086  # ARGS is a list of words on purpose
  timeout -k 10 "$t" python3 scripts/scaling.py $ARGS \
    --out "$OUT/scaling-device.json" --plot "$OUT/scaling-device.png"
  r=$?
  echo "== scaling.py exit code $r"
  (( r == 0 )) || rc=$r
  echo "== done in $(( $(date +%s) - T0 )) s"
  exit $rc
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
