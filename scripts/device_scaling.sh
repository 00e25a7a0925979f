#!/usr/bin/env bash
# Scaling run on a lent many-core machine (16 cores) where shardpool's dependencies are not
# installed and nothing can be downloaded. Self-contained: installs the wheels carried in .whl/
# (prepared on the development machine, see bench/README.md), runs scripts/scaling.py for
# 1, 2, 4, 8, 12 and 15 workers (the real Lightning traffic first: BOLT #2 wire messages with
# secp256k1 checks; then the synthetic CPU-costed and trivial-handler series), and leaves in $OUT:
#   scaling-device.json  every point, the ratios and the targets (written after each point, so a
#                        run cut short still leaves what it measured; "complete" says which)
#   scaling-device.png   the plot, where matplotlib is installed on the machine
#   scaling-device.log   the whole output
# Budget: ~5 minutes of measurement on 16 cores, hard-stopped at 540 s (inside a 10-minute slot).
#
# Run from the repository root, with .whl carried:  bash scripts/device_scaling.sh
set -u -o pipefail

OUT="${OUT:-$PWD/results/device}"
mkdir -p "$OUT"
LOG="$OUT/scaling-device.log"
export PYTHONUNBUFFERED=1

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

  # The real series first (the figure this machine is for: a node's own work per message, ~100 us
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
  # shellcheck disable=SC2086  # ARGS is a list of words on purpose
  timeout -k 10 "${SCALING_TIMEOUT_S:-540}" python3 scripts/scaling.py $ARGS \
    --out "$OUT/scaling-device.json" --plot "$OUT/scaling-device.png"
  rc=$?
  echo "== scaling.py exit code $rc"
  exit $rc
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
