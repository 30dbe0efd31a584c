#!/usr/bin/env bash
# Makes sure a Docker daemon answers on /var/run/docker.sock. Starts one when
# none does, without a bridge network or iptables rules: sidecars run with
# network mode "none", and this machine must not route to private ranges.
set -euo pipefail
sock=/var/run/docker.sock
ping() { curl -sf --unix-socket "$sock" http://localhost/_ping >/dev/null 2>&1; }
ping && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "no Docker daemon answers on $sock, and starting one needs root" >&2
  exit 1
fi
log=${DOCKERD_LOG:-/tmp/sidecar-executor-dockerd.log}
echo "starting dockerd (log: $log)"
setsid dockerd --bridge=none --iptables=false --ip-masq=false >"$log" 2>&1 < /dev/null &
for _ in $(seq 1 60); do
  ping && exit 0
  sleep 0.5
done
echo "dockerd did not answer within 30 s; last lines of $log:" >&2
tail -n 20 "$log" >&2
exit 1
