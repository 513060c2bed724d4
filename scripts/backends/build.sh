#!/usr/bin/env bash
# Build, or reuse from the cache, the tracing backends the test suite runs on
# loopback, with the machine's Go toolchain and modules from the Go module proxy:
#
#   jaeger     Jaeger v2 all-in-one (github.com/jaegertracing/jaeger/cmd/jaeger).
#              Its version is the jaegertracing/jaeger image tag in
#              docker-compose.yml; Jaeger v2.N.M is the Go module tag v1.(63+N).M.
#   collector  An OpenTelemetry Collector built by the official builder (ocb,
#              go.opentelemetry.io/collector/cmd/builder) from
#              deploy/collector/builder.yaml; ocb's version is that manifest's
#              dist.version.
#   prometheus Prometheus (github.com/prometheus/prometheus/cmd/prometheus), the
#              metrics store of the stack. Its version is the prom/prometheus
#              image tag in docker-compose.yml; Prometheus 3.X.Y is the Go module
#              tag v0.(300+X).Y. Built with the tag remove_all_sd (no service
#              discovery plugins: nothing is scraped) and without the web UI's
#              assets (the tag builtinassets is not set): the HTTP API, the OTLP
#              receiver and the TSDB are all there.
#
# Usage: scripts/backends/build.sh [all|jaeger|collector|prometheus]   (default: all)
#
# stdout carries only shell assignments, so callers can
#   eval "$(scripts/backends/build.sh)"
# to get JAEGER_BIN, OTELCOL_BIN, PROMETHEUS_BIN (and JAEGER_VERSION,
# OTELCOL_VERSION, PROMETHEUS_VERSION); progress goes to stderr. A second run with the same versions and manifest does no work.
#
# Environment:
#   CIRRON_BACKENDS_CACHE   cache dir (default $HOME/.cache/cirron-otel/backends)
#   CIRRON_JAEGER_VERSION   Jaeger v2 version, e.g. 2.13.0 (default: from docker-compose.yml)
#   CIRRON_OCB_VERSION      ocb version, e.g. 0.165.0 (default: from builder.yaml)
#   CIRRON_PROMETHEUS_VERSION  Prometheus 3.x version, e.g. 3.16.0 (default: from docker-compose.yml)
#   CIRRON_BUILD_JOBS       go build -p (default 2)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${CIRRON_BACKENDS_CACHE:-$HOME/.cache/cirron-otel/backends}
JOBS=${CIRRON_BUILD_JOBS:-2}
COMPOSE_FILE=$REPO/docker-compose.yml
MANIFEST=$REPO/deploy/collector/builder.yaml
WHAT=${1:-all}

log() { printf '[backends/build] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

case "$WHAT" in all | jaeger | collector | prometheus) ;; *) die "usage: $0 [all|jaeger|collector|prometheus]" ;; esac
command -v go >/dev/null || die "the Go toolchain (go) is not on PATH"

# Versions: one source of truth each (compose image tag / builder manifest).
JAEGER_VERSION=${CIRRON_JAEGER_VERSION:-$(sed -n 's#^[[:space:]]*image:[[:space:]]*jaegertracing/jaeger:\([0-9][0-9.]*\).*#\1#p' "$COMPOSE_FILE" | head -n1)}
[[ $JAEGER_VERSION =~ ^2\.([0-9]+)\.([0-9]+)$ ]] || die "cannot read a Jaeger 2.x version (got '$JAEGER_VERSION')"
JAEGER_MODULE_VERSION="v1.$((63 + BASH_REMATCH[1])).${BASH_REMATCH[2]}"
OCB_VERSION=${CIRRON_OCB_VERSION:-$(sed -n '/^dist:/,/^[^[:space:]]/s/^[[:space:]]*version:[[:space:]]*"\{0,1\}\([0-9][0-9.]*\)"\{0,1\}.*/\1/p' "$MANIFEST" | head -n1)}
[[ $OCB_VERSION =~ ^0\.[0-9]+\.[0-9]+$ ]] || die "cannot read dist.version from $MANIFEST (got '$OCB_VERSION')"
PROMETHEUS_VERSION=${CIRRON_PROMETHEUS_VERSION:-$(sed -n 's#^[[:space:]]*image:[[:space:]]*prom/prometheus:v\([0-9][0-9.]*\).*#\1#p' "$COMPOSE_FILE" | head -n1)}
[[ $PROMETHEUS_VERSION =~ ^3\.([0-9]+)\.([0-9]+)$ ]] || die "cannot read a Prometheus 3.x version (got '$PROMETHEUS_VERSION')"
PROMETHEUS_MODULE_VERSION="v0.$((300 + BASH_REMATCH[1])).${BASH_REMATCH[2]}"

PLATFORM="$(go env GOOS)-$(go env GOARCH)"
# Go settings for every build here: no VCS stamping, bounded parallelism (ocb
# runs 'go mod tidy' and 'go build' itself and inherits these).
export GOFLAGS="-buildvcs=false -p=$JOBS"
export GO111MODULE=on
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.work.XXXXXX")
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT

# One build at a time per cache (tests may call this concurrently); a cache
# hit takes no lock.
LOCKED=
lock() {
  if [[ -z $LOCKED ]]; then
    exec 9>"$CACHE/.lock"
    flock 9
    LOCKED=1
  fi
}

# Directory of module@version in the module cache, downloading it if needed.
module_dir() {
  (cd "$WORK" && go mod download -json "$1@$2") | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p'
}

build_jaeger() {
  local dest="$CACHE/jaeger/$JAEGER_VERSION-$PLATFORM"
  JAEGER_BIN="$dest/jaeger"
  [[ -x $JAEGER_BIN ]] || lock
  if [[ -x $JAEGER_BIN ]]; then
    log "jaeger $JAEGER_VERSION: cached at $JAEGER_BIN"
    return
  fi
  log "jaeger $JAEGER_VERSION: building module github.com/jaegertracing/jaeger@$JAEGER_MODULE_VERSION (cmd/jaeger) ..."
  local t0=$SECONDS src
  src=$(module_dir github.com/jaegertracing/jaeger "$JAEGER_MODULE_VERSION")
  [[ -n $src && -f $src/cmd/jaeger/main.go ]] || die "could not download github.com/jaegertracing/jaeger@$JAEGER_MODULE_VERSION"
  # The module has replace directives, so 'go install pkg@version' refuses it:
  # build inside a writable copy of the module, with its own go.mod and go.sum.
  cp -r "$src" "$WORK/jaeger-src"
  chmod -R u+w "$WORK/jaeger-src"
  local vpkg=github.com/jaegertracing/jaeger/internal/version
  (cd "$WORK/jaeger-src" && GOFLAGS="-mod=readonly -buildvcs=false -p=$JOBS" \
    go build -trimpath \
      -ldflags "-s -w -X $vpkg.latestVersion=v$JAEGER_VERSION -X $vpkg.commitSHA=$JAEGER_MODULE_VERSION" \
      -o "$WORK/jaeger" ./cmd/jaeger)
  mkdir -p "$dest"
  mv "$WORK/jaeger" "$JAEGER_BIN"
  log "jaeger $JAEGER_VERSION: built in $((SECONDS - t0)) s -> $JAEGER_BIN"
}

build_ocb() {
  local dest="$CACHE/ocb/$OCB_VERSION-$PLATFORM"
  OCB_BIN="$dest/ocb"
  if [[ -x $OCB_BIN ]]; then return; fi
  log "ocb $OCB_VERSION: installing go.opentelemetry.io/collector/cmd/builder@v$OCB_VERSION ..."
  (cd "$WORK" && GOBIN="$WORK/ocb-bin" go install "go.opentelemetry.io/collector/cmd/builder@v$OCB_VERSION")
  mkdir -p "$dest"
  mv "$WORK/ocb-bin/builder" "$OCB_BIN"
}

build_collector() {
  local sum dest
  sum=$(sha256sum "$MANIFEST" | cut -c1-12)
  dest="$CACHE/otelcol/$OCB_VERSION-$sum-$PLATFORM"
  OTELCOL_BIN="$dest/otelcol-cirron"
  [[ -x $OTELCOL_BIN ]] || lock
  if [[ -x $OTELCOL_BIN ]]; then
    log "collector $OCB_VERSION (manifest $sum): cached at $OTELCOL_BIN"
    return
  fi
  build_ocb
  log "collector $OCB_VERSION (manifest $sum): building with ocb from $MANIFEST ..."
  local t0=$SECONDS
  mkdir -p "$WORK/otelcol"
  cp "$MANIFEST" "$WORK/otelcol/builder.yaml"
  (cd "$WORK/otelcol" && "$OCB_BIN" --config=builder.yaml >&2)
  mkdir -p "$dest"
  mv "$WORK/otelcol/_build/otelcol-cirron" "$OTELCOL_BIN"
  cp "$MANIFEST" "$dest/builder.yaml"
  log "collector $OCB_VERSION: built in $((SECONDS - t0)) s -> $OTELCOL_BIN"
}

build_prometheus() {
  local dest="$CACHE/prometheus/$PROMETHEUS_VERSION-$PLATFORM"
  PROMETHEUS_BIN="$dest/prometheus"
  [[ -x $PROMETHEUS_BIN ]] || lock
  if [[ -x $PROMETHEUS_BIN ]]; then
    log "prometheus $PROMETHEUS_VERSION: cached at $PROMETHEUS_BIN"
    return
  fi
  log "prometheus $PROMETHEUS_VERSION: installing github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_MODULE_VERSION ..."
  local t0=$SECONDS vpkg=github.com/prometheus/common/version
  # go.mod has no replace directive, so 'go install pkg@version' builds it as released.
  (cd "$WORK" && GOBIN="$WORK/prometheus-bin" go install -trimpath -tags remove_all_sd \
    -ldflags "-s -w -X $vpkg.Version=$PROMETHEUS_VERSION -X $vpkg.Revision=$PROMETHEUS_MODULE_VERSION -X $vpkg.Branch=module" \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_MODULE_VERSION")
  mkdir -p "$dest"
  mv "$WORK/prometheus-bin/prometheus" "$PROMETHEUS_BIN"
  log "prometheus $PROMETHEUS_VERSION: built in $((SECONDS - t0)) s -> $PROMETHEUS_BIN"
}

if [[ $WHAT == all || $WHAT == jaeger ]]; then
  build_jaeger
  printf 'JAEGER_VERSION=%q\nJAEGER_BIN=%q\n' "$JAEGER_VERSION" "$JAEGER_BIN"
fi
if [[ $WHAT == all || $WHAT == collector ]]; then
  build_collector
  printf 'OTELCOL_VERSION=%q\nOTELCOL_BIN=%q\n' "$OCB_VERSION" "$OTELCOL_BIN"
fi
if [[ $WHAT == all || $WHAT == prometheus ]]; then
  build_prometheus
  printf 'PROMETHEUS_VERSION=%q\nPROMETHEUS_BIN=%q\n' "$PROMETHEUS_VERSION" "$PROMETHEUS_BIN"
fi
