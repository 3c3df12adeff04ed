#!/usr/bin/env bash
# The dashboard (uvicorn: flow control on request bodies, so uploads stream), two Celery workers
# and beat, stopped together on Ctrl-C. One worker per queue (settings.PIPELINE_QUEUE and
# WATCH_QUEUE), so clone, build and submit never wait behind watching, stop and reconcile (the watch
# worker also posts commit statuses and notifications, settings.NOTIFY_QUEUE); beat
# runs inside the watch worker (exactly one beat per deployment).
set -euo pipefail
if [[ -z ${AICHOR_RUN_JOB:-} && -t 0 ]]; then
  # Run again as a foreground job of its own (job control): Ctrl-C then reaches this script and
  # its servers only, not `make`, which would die of it and end with an error of its own.
  set -m
  AICHOR_RUN_JOB=1 "$0" "$@"
  exit
fi
BIN=${BIN:-.venv/bin}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
# bootstrap's notes show at once (stderr); its login box (stdout) is kept, unexported, for the end.
login=$("$BIN/python" manage.py bootstrap)
# Task by task INFO lines would bury the login box; AICHOR_WORKER_LOG_LEVEL=INFO brings them back.
WORKER_LOG_LEVEL=${AICHOR_WORKER_LOG_LEVEL:-WARNING}
pids=()
stop() {
  kill "${pids[@]}" 2>/dev/null || true
  wait || true
}
# Ctrl-C is how a user ends `make run`: a clean stop and exit 0, not an error.
trap 'trap - EXIT; stop; exit 0' INT TERM
trap stop EXIT
# Pipeline threads wait on Docker and git most of the time (a container's start is most of a
# submit): 8 keep the Docker daemon starting while others clone and build. 4 on the embedded
# SQLite, whose single writer they would queue on.
PIPELINE_CONCURRENCY=${AICHOR_PIPELINE_CONCURRENCY:-8}
[[ ${DATABASE_URL:-} == postgres* ]] || PIPELINE_CONCURRENCY=${AICHOR_PIPELINE_CONCURRENCY:-4}
"$BIN/celery" -A aichor --quiet worker -n pipeline@%h -Q celery --loglevel="$WORKER_LOG_LEVEL" --concurrency="$PIPELINE_CONCURRENCY" --pool=threads &
pids+=($!)
"$BIN/celery" -A aichor --quiet worker -n watch@%h -Q watch,notify --beat --loglevel="$WORKER_LOG_LEVEL" --concurrency=4 --pool=threads \
  --schedule="${AICHOR_DATA_DIR:-var}/celerybeat-schedule" &
pids+=($!)
# Web server processes: on PostgreSQL one per core, so a webhook burst or a busy dashboard uses
# every core; on the embedded SQLite one, as it has a single writer for all of them to queue on.
if [[ ${DATABASE_URL:-} == postgres* ]]; then
  WEB_WORKERS=${AICHOR_WEB_WORKERS:-$(nproc)}
else
  WEB_WORKERS=${AICHOR_WEB_WORKERS:-1}
fi
# ServerLoop: a process busy with webhook deliveries leaves new connections to the others.
"$BIN/uvicorn" aichor.asgi:application --host "$HOST" --port "$PORT" --workers "$WEB_WORKERS" \
  --http httptools --ws websockets-sansio --lifespan on --loop aichor.asgi:ServerLoop &
pids+=($!)

answers() {
  local host=$HOST status
  case $host in 0.0.0.0 | "") host=127.0.0.1 ;; :: | "[::]") host=::1 ;; esac
  host=${host#[}
  exec 3<>"/dev/tcp/${host%]}/$PORT" || return 1
  printf 'HEAD /login/ HTTP/1.0\r\nHost: %s\r\n\r\n' "$HOST" >&3
  read -r -t 5 status <&3 || true
  exec 3<&-
  [[ $status == HTTP/* ]]
}
# The box last: once the server answers a request, its start-up lines are already out.
until answers 2>/dev/null; do
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || { wait -n; exit; }; done
  sleep 0.2
done
printf '\n%s\n\n' "$login"
wait -n
