#!/usr/bin/env bash
# What the test suite needs on this machine: a Docker Engine (installed and started when we are
# root and none runs), busybox-static for the tiny test image, git, and Chromium for browser tests.
set -euo pipefail

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v busybox >/dev/null || need+=(busybox-static)
command -v git >/dev/null || need+=(git)
command -v chromium >/dev/null || need+=(chromium)
# Docker builds with build secrets run with buildah (the classic builder has no secret mounts).
command -v buildah >/dev/null || need+=(buildah)
# The Kubernetes engine pushes images to a registry: tests run Debian's on 127.0.0.1.
command -v docker-registry >/dev/null || need+=(docker-registry)
# The KubeRay tests run real Ray in a Python image made from a debootstrap'd root (no registry).
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing ${need[*]}: tests that need them will skip (install them as root)" >&2
  fi
fi

# Docker watches each followed log with an inotify instance; past the limit (128 by default) it
# polls the file every 200 ms instead (README: a Docker host running hundreds of experiments).
if [ "$(id -u)" = 0 ] && [ "$(cat /proc/sys/fs/inotify/max_user_instances 2>/dev/null || echo 8192)" -lt 8192 ]; then
  sysctl -qw fs.inotify.max_user_instances=8192 2>/dev/null || true
fi
if ! docker info >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null; then
  echo "starting dockerd"
  mkdir -p /var/log
  # No bridge network: containers use the host network (or none).
  nohup dockerd --bridge=none --iptables=false >/var/log/aichor-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/aichor-dockerd.log" >&2; exit 1; }
fi
