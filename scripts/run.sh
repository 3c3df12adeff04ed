#!/usr/bin/env bash
# The dashboard (uvicorn: flow control on request bodies, so uploads stream), a Celery worker
# and beat, stopped together on Ctrl-C.
set -euo pipefail
BIN=${BIN:-.venv/bin}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
"$BIN/celery" -A aichor worker --beat --loglevel=INFO --concurrency=4 --pool=threads \
  --schedule="${AICHOR_DATA_DIR:-var}/celerybeat-schedule" &
pids+=($!)
"$BIN/uvicorn" aichor.asgi:application --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" \
  --http httptools --ws websockets-sansio &
pids+=($!)
wait -n
