#!/usr/bin/env bash
# The dashboard (uvicorn: flow control on request bodies, so uploads stream), two Celery workers
# and beat, stopped together on Ctrl-C. One worker per queue (settings.PIPELINE_QUEUE and
# WATCH_QUEUE), so clone, build and submit never wait behind watching, stop and reconcile; beat
# runs inside the watch worker (exactly one beat per deployment).
set -euo pipefail
BIN=${BIN:-.venv/bin}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
"$BIN/celery" -A aichor worker -n pipeline@%h -Q celery --loglevel=INFO --concurrency=4 --pool=threads &
pids+=($!)
"$BIN/celery" -A aichor worker -n watch@%h -Q watch --beat --loglevel=INFO --concurrency=4 --pool=threads \
  --schedule="${AICHOR_DATA_DIR:-var}/celerybeat-schedule" &
pids+=($!)
"$BIN/uvicorn" aichor.asgi:application --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" \
  --http httptools --ws websockets-sansio &
pids+=($!)
wait -n
