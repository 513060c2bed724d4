#!/usr/bin/env bash
# Start the locally built Jaeger, Prometheus and/or OpenTelemetry Collector on
# loopback, with the same config files docker-compose.yml mounts
# (deploy/jaeger/config.yaml, deploy/prometheus/prometheus.yml,
# deploy/collector/config.yaml), wait until they are ready, and print where they
# are. Builds them first through build.sh when they are not cached yet.
#
# Usage: scripts/backends/start.sh [all|jaeger|prometheus|collector]   (default: all)
#   all        Jaeger and Prometheus, plus a collector that forwards traces to that
#              Jaeger and metrics to that Prometheus
#   jaeger     Jaeger alone (send OTLP straight to it)
#   prometheus Prometheus alone (OTLP/HTTP metrics to $PROMETHEUS_URL/api/v1/otlp/v1/metrics)
#   collector  a collector alone, forwarding traces to CIRRON_JAEGER_OTLP_ENDPOINT and
#              metrics to CIRRON_PROMETHEUS_OTLP_ENDPOINT (when set)
#
# stdout carries only KEY=VALUE lines (eval-able, easy to parse):
#   CIRRON_BACKENDS_RUN_DIR   logs (jaeger.log, collector.log), pid files, backends.env
#   JAEGER_PID JAEGER_QUERY_URL JAEGER_OTLP_GRPC_ENDPOINT JAEGER_OTLP_HTTP_ENDPOINT
#   JAEGER_*_PORT             every port Jaeger listens on
#   PROMETHEUS_PID PROMETHEUS_URL PROMETHEUS_OTLP_ENDPOINT PROMETHEUS_PORT
#   COLLECTOR_PID COLLECTOR_OTLP_GRPC_ENDPOINT COLLECTOR_OTLP_HTTP_ENDPOINT COLLECTOR_*_PORT
# Stop them with: scripts/backends/stop.sh "$CIRRON_BACKENDS_RUN_DIR"
#
# Environment (ports: a number, or "auto" for a free one):
#   CIRRON_BACKENDS_HOST              listen address (127.0.0.1)
#   CIRRON_BACKENDS_RUN_DIR           where to put logs and pid files (a new temp dir)
#   CIRRON_BACKENDS_START_TIMEOUT     seconds to wait for readiness (60)
#   CIRRON_JAEGER_OTLP_GRPC_PORT      (4317 for 'jaeger', 14317 for 'all')
#   CIRRON_JAEGER_OTLP_HTTP_PORT      (4318 for 'jaeger', 14318 for 'all')
#   CIRRON_JAEGER_UI_PORT             UI + HTTP query API (16686)
#   CIRRON_JAEGER_QUERY_GRPC_PORT     (16685)
#   CIRRON_JAEGER_HEALTH_PORT         (13134)
#   CIRRON_PROMETHEUS_PORT            UI + HTTP API + OTLP receiver (9090)
#   CIRRON_COLLECTOR_OTLP_GRPC_PORT   (4317)
#   CIRRON_COLLECTOR_OTLP_HTTP_PORT   (4318)
#   CIRRON_COLLECTOR_HEALTH_PORT      (13133)
#   CIRRON_COLLECTOR_METRICS_PORT     (8888)
#   CIRRON_JAEGER_OTLP_ENDPOINT       Jaeger OTLP gRPC host:port for 'collector' alone
#   CIRRON_TEMPO_OTLP_ENDPOINT        if set, the collector also exports to this Tempo
#                                     (host:port, OTLP gRPC), as in the compose stack
#   CIRRON_PROMETHEUS_OTLP_ENDPOINT   Prometheus's OTLP base URL for 'collector' alone
#                                     (http://host:port/api/v1/otlp)
#   plus build.sh's variables (CIRRON_BACKENDS_CACHE, ...)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WHAT=${1:-all}
HOST=${CIRRON_BACKENDS_HOST:-127.0.0.1}
TIMEOUT=${CIRRON_BACKENDS_START_TIMEOUT:-60}

log() { printf '[backends/start] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
case "$WHAT" in all | jaeger | prometheus | collector) ;; *) die "usage: $0 [all|jaeger|prometheus|collector]" ;; esac

RUN_DIR=${CIRRON_BACKENDS_RUN_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/cirron-backends.XXXXXX")}
mkdir -p "$RUN_DIR"
OUT="$RUN_DIR/backends.env"
: >"$OUT"
emit() { printf '%s=%s\n' "$1" "$2" | tee -a "$OUT"; }

free_port() {
  python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1]); s.close()' "$HOST"
}
port() { # port VALUE DEFAULT
  local v=${1:-$2}
  if [[ $v == auto ]]; then free_port; else printf '%s\n' "$v"; fi
}
port_busy() {
  python3 -c 'import socket,sys; s=socket.socket(); s.settimeout(0.5); sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)' "$HOST" "$1"
}
http_ok() { # http_ok URL -> 0 when it answers 2xx
  python3 -c 'import sys,urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r: sys.exit(0 if 200 <= r.status < 300 else 1)
except Exception: sys.exit(1)' "$1"
}
# wait_ready NAME PID LOG URL...: every URL answers 2xx, or fail with the log's tail
wait_ready() {
  local name=$1 pid=$2 logf=$3 url deadline=$((SECONDS + TIMEOUT))
  shift 3
  for url in "$@"; do
    until http_ok "$url"; do
      if ! kill -0 "$pid" 2>/dev/null; then
        tail -n 30 "$logf" >&2 || true
        die "$name (pid $pid) exited before it was ready; log: $logf"
      fi
      if ((SECONDS >= deadline)); then
        tail -n 30 "$logf" >&2 || true
        die "$name (pid $pid) not ready after ${TIMEOUT}s ($url); log: $logf"
      fi
      sleep 0.2
    done
  done
}
check_free() {
  local p
  for p in "$@"; do
    port_busy "$p" && die "port $HOST:$p is already in use"
  done
  return 0
}
# start NAME LOG BIN ARGS... ; env for the child is set by the caller with 'env'
start_bg() {
  local name=$1 logf=$2
  shift 2
  nohup setsid "$@" >"$logf" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/$name.pid"
  printf '%s\n' "$!"
}

# On failure, stop whatever this run started.
STARTED=()
cleanup_on_failure() {
  local rc=$? pid
  if ((rc != 0)); then
    for pid in "${STARTED[@]}"; do kill "$pid" 2>/dev/null || true; done
  fi
}
trap cleanup_on_failure EXIT

emit CIRRON_BACKENDS_RUN_DIR "$RUN_DIR"

eval "$("$HERE/build.sh" "$WHAT")"

if [[ $WHAT == all || $WHAT == jaeger ]]; then
  if [[ $WHAT == all ]]; then dg=14317 dh=14318; else dg=4317 dh=4318; fi
  J_GRPC=$(port "${CIRRON_JAEGER_OTLP_GRPC_PORT:-}" $dg)
  J_HTTP=$(port "${CIRRON_JAEGER_OTLP_HTTP_PORT:-}" $dh)
  J_UI=$(port "${CIRRON_JAEGER_UI_PORT:-}" 16686)
  J_QGRPC=$(port "${CIRRON_JAEGER_QUERY_GRPC_PORT:-}" 16685)
  J_HEALTH=$(port "${CIRRON_JAEGER_HEALTH_PORT:-}" 13134)
  check_free "$J_GRPC" "$J_HTTP" "$J_UI" "$J_QGRPC" "$J_HEALTH"
  JPID=$(start_bg jaeger "$RUN_DIR/jaeger.log" env \
    JAEGER_LISTEN_HOST="$HOST" JAEGER_OTLP_GRPC_PORT="$J_GRPC" JAEGER_OTLP_HTTP_PORT="$J_HTTP" \
    JAEGER_QUERY_HTTP_PORT="$J_UI" JAEGER_QUERY_GRPC_PORT="$J_QGRPC" JAEGER_HEALTH_PORT="$J_HEALTH" \
    "$JAEGER_BIN" --config="$REPO/deploy/jaeger/config.yaml")
  STARTED+=("$JPID")
  log "jaeger $JAEGER_VERSION: pid $JPID, log $RUN_DIR/jaeger.log; waiting ..."
  wait_ready jaeger "$JPID" "$RUN_DIR/jaeger.log" \
    "http://$HOST:$J_HEALTH/status" "http://$HOST:$J_UI/api/services"
  log "jaeger ready: UI/API http://$HOST:$J_UI, OTLP gRPC $HOST:$J_GRPC, OTLP HTTP $HOST:$J_HTTP"
  emit JAEGER_PID "$JPID"
  emit JAEGER_VERSION "$JAEGER_VERSION"
  emit JAEGER_QUERY_URL "http://$HOST:$J_UI"
  emit JAEGER_OTLP_GRPC_ENDPOINT "http://$HOST:$J_GRPC"
  emit JAEGER_OTLP_HTTP_ENDPOINT "http://$HOST:$J_HTTP"
  emit JAEGER_OTLP_GRPC_PORT "$J_GRPC"
  emit JAEGER_OTLP_HTTP_PORT "$J_HTTP"
  emit JAEGER_UI_PORT "$J_UI"
  emit JAEGER_QUERY_GRPC_PORT "$J_QGRPC"
  emit JAEGER_HEALTH_PORT "$J_HEALTH"
  JAEGER_TARGET="$HOST:$J_GRPC"
fi

PROMETHEUS_OTLP=${CIRRON_PROMETHEUS_OTLP_ENDPOINT:-http://127.0.0.1:1/api/v1/otlp}
if [[ $WHAT == all || $WHAT == prometheus ]]; then
  P_PORT=$(port "${CIRRON_PROMETHEUS_PORT:-}" 9090)
  check_free "$P_PORT"
  mkdir -p "$RUN_DIR/prometheus-data"
  # the flags of the compose service (the OTLP receiver, exemplar storage), on loopback
  PPID_=$(start_bg prometheus "$RUN_DIR/prometheus.log" "$PROMETHEUS_BIN" \
    --config.file="$REPO/deploy/prometheus/prometheus.yml" --storage.tsdb.path="$RUN_DIR/prometheus-data" \
    --web.listen-address="$HOST:$P_PORT" --web.enable-otlp-receiver --enable-feature=exemplar-storage)
  STARTED+=("$PPID_")
  log "prometheus $PROMETHEUS_VERSION: pid $PPID_, log $RUN_DIR/prometheus.log; waiting ..."
  wait_ready prometheus "$PPID_" "$RUN_DIR/prometheus.log" "http://$HOST:$P_PORT/-/ready"
  log "prometheus ready: API http://$HOST:$P_PORT, OTLP http://$HOST:$P_PORT/api/v1/otlp/v1/metrics"
  emit PROMETHEUS_PID "$PPID_"
  emit PROMETHEUS_VERSION "$PROMETHEUS_VERSION"
  emit PROMETHEUS_URL "http://$HOST:$P_PORT"
  emit PROMETHEUS_OTLP_ENDPOINT "http://$HOST:$P_PORT/api/v1/otlp"
  emit PROMETHEUS_PORT "$P_PORT"
  PROMETHEUS_OTLP="http://$HOST:$P_PORT/api/v1/otlp"
fi

if [[ $WHAT == all || $WHAT == collector ]]; then
  if [[ $WHAT == collector ]]; then
    JAEGER_TARGET=${CIRRON_JAEGER_OTLP_ENDPOINT:?set CIRRON_JAEGER_OTLP_ENDPOINT=host:port of a Jaeger OTLP gRPC receiver}
  fi
  C_GRPC=$(port "${CIRRON_COLLECTOR_OTLP_GRPC_PORT:-}" 4317)
  C_HTTP=$(port "${CIRRON_COLLECTOR_OTLP_HTTP_PORT:-}" 4318)
  C_HEALTH=$(port "${CIRRON_COLLECTOR_HEALTH_PORT:-}" 13133)
  C_METRICS=$(port "${CIRRON_COLLECTOR_METRICS_PORT:-}" 8888)
  check_free "$C_GRPC" "$C_HTTP" "$C_HEALTH" "$C_METRICS"
  exporters='[otlp_grpc/jaeger]'
  [[ -n ${CIRRON_TEMPO_OTLP_ENDPOINT:-} ]] && exporters='[otlp_grpc/jaeger, otlp_grpc/tempo]'
  CPID=$(start_bg collector "$RUN_DIR/collector.log" env \
    COLLECTOR_LISTEN_HOST="$HOST" COLLECTOR_OTLP_GRPC_PORT="$C_GRPC" COLLECTOR_OTLP_HTTP_PORT="$C_HTTP" \
    COLLECTOR_HEALTH_PORT="$C_HEALTH" COLLECTOR_METRICS_PORT="$C_METRICS" \
    JAEGER_OTLP_ENDPOINT="$JAEGER_TARGET" TEMPO_OTLP_ENDPOINT="${CIRRON_TEMPO_OTLP_ENDPOINT:-127.0.0.1:1}" \
    COLLECTOR_TRACES_EXPORTERS="$exporters" PROMETHEUS_OTLP_ENDPOINT="$PROMETHEUS_OTLP" \
    "$OTELCOL_BIN" --config="$REPO/deploy/collector/config.yaml")
  STARTED+=("$CPID")
  log "collector $OTELCOL_VERSION: pid $CPID, log $RUN_DIR/collector.log; waiting ..."
  wait_ready collector "$CPID" "$RUN_DIR/collector.log" "http://$HOST:$C_HEALTH/"
  log "collector ready: OTLP gRPC $HOST:$C_GRPC, OTLP HTTP $HOST:$C_HTTP -> $exporters (jaeger $JAEGER_TARGET), metrics -> $PROMETHEUS_OTLP"
  emit COLLECTOR_PID "$CPID"
  emit COLLECTOR_VERSION "$OTELCOL_VERSION"
  emit COLLECTOR_OTLP_GRPC_ENDPOINT "http://$HOST:$C_GRPC"
  emit COLLECTOR_OTLP_HTTP_ENDPOINT "http://$HOST:$C_HTTP"
  emit COLLECTOR_OTLP_GRPC_PORT "$C_GRPC"
  emit COLLECTOR_OTLP_HTTP_PORT "$C_HTTP"
  emit COLLECTOR_HEALTH_PORT "$C_HEALTH"
  emit COLLECTOR_METRICS_PORT "$C_METRICS"
fi
