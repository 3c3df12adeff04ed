#!/usr/bin/env bash
# The dashboard (daphne), a Celery worker and beat, stopped together on Ctrl-C.
set -euo pipefail
BIN=${BIN:-.venv/bin}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
"$BIN/celery" -A aichor worker --beat --loglevel=INFO --concurrency=4 --pool=threads \
  --schedule="${AICHOR_DATA_DIR:-var}/celerybeat-schedule" &
pids+=($!)
"$BIN/daphne" -b "${HOST:-127.0.0.1}" -p "${PORT:-8000}" aichor.asgi:application &
pids+=($!)
wait -n
