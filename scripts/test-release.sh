#!/usr/bin/env bash
# Test the release as a user gets it, not the checkout:
#   1. build the sdist and the manylinux wheels (scripts/build-wheels.sh);
#   2. the sdist alone: a fresh venv installs it (compiling the extension from it), then the
#      whole test suite runs from the unpacked sdist;
#   3. each wheel on its own interpreter in a fresh venv: the suite without the real-backend
#      tests (the full suite runs on 3.11, from the checkout and from the sdist); on 3.12 with
#      every runtime dependency at its declared minimum (scripts/dependency_floors.py).
#
# Usage: scripts/test-release.sh [WORK_DIR]     (default: a temporary directory)
# Exit status: non-zero if any step fails. Pytest's "no tests ran" (5) counts as a failure.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK"
DIST=$WORK/dist
log() { printf '\n[test-release] %s\n' "$*" >&2; }

run_pytest() {  # run_pytest PYTHON DIR ARGS...: pytest in DIR, failing on "no tests ran"
    local py=$1 dir=$2
    shift 2
    local rc=0
    (cd "$dir" && "$py" -m pytest -p no:cacheprovider "$@") || rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "[test-release] pytest collected no tests in $dir" >&2
        return 1
    fi
    return "$rc"
}

installed_from_site_packages() {  # the tests must import the installed package, not a tree
    "$1" -c 'import cirron_otel, sys; f = cirron_otel.__file__; print(f); sys.exit("site-packages" not in f)'
}

log "building the sdist and wheels into $DIST"
rm -rf "$DIST"
"$REPO/scripts/build-wheels.sh" "$DIST"

log "sdist: install it in a fresh venv and run the whole suite from it"
SDIST=$(ls "$DIST"/cirron_otel-*.tar.gz)
rm -rf "$WORK/sdist" "$WORK/venv-sdist"
mkdir -p "$WORK/sdist"
tar -xzf "$SDIST" -C "$WORK/sdist" --strip-components=1
python3 -m venv "$WORK/venv-sdist"
"$WORK/venv-sdist/bin/pip" install --quiet --upgrade pip
"$WORK/venv-sdist/bin/pip" install --quiet "$SDIST[test]"
installed_from_site_packages "$WORK/venv-sdist/bin/python"
run_pytest "$WORK/venv-sdist/bin/python" "$WORK/sdist" -q

for minor in 12 13; do
    py=$(ls -d "$HOME"/.pyenv/versions/3."$minor".*/bin/python3 2>/dev/null | sort -V | tail -n1 || true)
    [ -z "$py" ] && py=$(command -v "python3.$minor" || true)
    if [ -z "$py" ]; then
        log "no CPython 3.$minor on this machine: its wheel is not tested"
        continue
    fi
    wheel=$(ls "$DIST"/cirron_otel-*-cp3"$minor"-cp3"$minor"-*manylinux*.whl)
    venv=$WORK/venv-3.$minor
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    constraints=()
    if [ "$minor" = 12 ]; then
        python3 "$REPO/scripts/dependency_floors.py" "$REPO" >"$WORK/floors.txt"
        constraints=(-c "$WORK/floors.txt")
        log "CPython 3.$minor: the wheel with every dependency at its floor: $(tr '\n' ' ' <"$WORK/floors.txt")"
    else
        log "CPython 3.$minor: the wheel"
    fi
    "$venv/bin/pip" install --quiet "${constraints[@]}" "$wheel[test-core]"
    installed_from_site_packages "$venv/bin/python"
    "$venv/bin/pip" list 2>/dev/null | grep -Ei '^(opentelemetry-(api|sdk|proto) |grpcio |protobuf |googleapis)' >&2
    run_pytest "$venv/bin/python" "$WORK/sdist" -q -m "not real_backend"
done
log "release tested"
