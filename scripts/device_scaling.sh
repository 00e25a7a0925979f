#!/usr/bin/env bash
# Scaling run on a lent many-core machine (16 cores) where shardpool's dependencies are not
# installed and nothing can be downloaded. Self-contained: installs the wheels carried in .whl/
# (prepared on the development machine, see bench/README.md), runs scripts/scaling.py for
# 1, 2, 4, 8 and 12 workers (trivial handler + CPU-costed LightningHandler), and leaves in $OUT:
#   scaling-device.json  every point, the ratios and the targets (written after each point, so a
#                        run cut short still leaves what it measured; "complete" says which)
#   scaling-device.png   the plot, where matplotlib is installed on the machine
#   scaling-device.log   the whole output
# Budget: ~3 minutes of measurement on 16 cores, hard-stopped at 330 s (inside a 6-minute slot).
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
  python3 -c 'import zmq, cbor2, xxhash, psutil, multiprocess, dill, shardpool;
print("pyzmq", zmq.__version__, "| libzmq", zmq.zmq_version(), "| multiprocess",
      multiprocess.__version__, "| psutil", psutil.__version__)' || exit 4

  # The CPU-costed series first (its efficiency up to cores - 1 is what this machine is for), the
  # same 60k messages at every worker count (~89 us of handler cost per message: ~7 s at 1
  # worker); then the trivial series, growing with the worker count (50k messages per worker, at
  # least 200k) so every run lasts long enough to time. ~3 min on 16 cores; if the deadline cuts
  # it short, the JSON keeps every point measured ("complete": false).
  # SCALING_ARGS / SCALING_TIMEOUT_S replace these for a local smoke test of this script.
  ARGS=${SCALING_ARGS:-"--workers 1 2 4 8 12 --series cpu trivial --cpu-messages 60000
    --cpu-cost-us 500 --messages 200000 --messages-per-worker 50000 --queue-messages 200000
    --repeats 3"}
  # shellcheck disable=SC2086  # ARGS is a list of words on purpose
  timeout -k 10 "${SCALING_TIMEOUT_S:-330}" python3 scripts/scaling.py $ARGS \
    --out "$OUT/scaling-device.json" --plot "$OUT/scaling-device.png"
  rc=$?
  echo "== scaling.py exit code $rc"
  exit $rc
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
