"""json.h's integer, hex and float writers compiled on their own (the header needs no Python),
with the SSE2 path and with the portable fallback (-DJSON_NO_SIMD), against Python's
formatting; floats must read back as the same double. A build of the package uses one path
only; this keeps the other one honest."""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
import subprocess
import sysconfig
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "cirron_otel"

PROGRAM = r"""
#include <stdio.h>
#include <inttypes.h>
#include "json.h"
int main(void) {
    unsigned long long hi, lo;
    long long v;
    char tag;
    ts_cache_t tc = {0}; /* one cache across the whole run, as one file's encode keeps it */
    while (scanf(" %c", &tag) == 1) {
        buf_t b = {0};
        if (tag == 'i' && scanf("%lld", &v) == 1)
            buf_i64(&b, (int64_t)v);
        else if (tag == 't' && scanf("%lld", &v) == 1)
            buf_ts(&b, (int64_t)v, &tc);
        else if (tag == 'x' && scanf("%llx %llx", &hi, &lo) == 2)
            buf_id(&b, hi, lo);
        else if (tag == 'f' && scanf("%llx", &hi) == 1) {
            double d;
            memcpy(&d, &hi, 8);
            buf_f64(&b, d);
        }
        else
            return 2;
        printf("%.*s\n", (int)b.len, b.data);
        free(b.data);
    }
    return 0;
}
"""


def _compiler() -> str:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    found = shutil.which(cc) or shutil.which("cc")
    if found is None:
        pytest.skip("no C compiler")
    return found


@pytest.mark.parametrize("flags", [[], ["-DJSON_NO_SIMD"]], ids=["simd", "portable"])
def test_integers_and_ids_match_python(tmp_path: Path, flags: list[str]) -> None:
    (tmp_path / "t.c").write_text(PROGRAM)
    exe = tmp_path / "t"
    subprocess.run(
        [
            _compiler(),
            "-O2",
            "-std=c11",
            "-Wall",
            "-Werror",
            "-Wno-unused-function",
            *flags,
            "-I",
            str(SRC),
            str(tmp_path / "t.c"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    rng = random.Random(7)
    ints = [0, 1, -1, 99, 100, 10**8 - 1, 10**8, 10**16, 2**63 - 1, -(2**63)]
    ints += [10**k + d for k in range(1, 19) for d in (-1, 0, 1)]
    ints += [rng.randint(-(2**63), 2**63 - 1) for _ in range(300)]
    ids = [(0, 0), (2**64 - 1, 2**64 - 1), (0x0123456789ABCDEF, 0xFEDCBA9876543210)]
    ids += [(rng.getrandbits(64), rng.getrandbits(64)) for _ in range(300)]
    floats = [0.5, 0.1, 1.0, 3.0, -2.5, 1e-7, 123456.789, 1e21, 1e22, 5e-324, 2.2250738585072014e-308]
    floats += [1.7976931348623157e308, 0.6931471805599453, 2**53, 2**53 + 2, 1 / 3, -0.0]
    floats += [rng.uniform(-10, 10) for _ in range(300)] + [
        rng.random() * 10 ** rng.randint(-30, 30) for _ in range(300)
    ]
    while len(floats) < 1200:  # any finite bit pattern
        (f,) = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))
        if math.isfinite(f):
            floats.append(f)
    # timestamps through buf_ts's cache: runs sharing their head, heads changing, small ones
    base = 1_780_000_000_000_000_000
    stamps = [base + rng.randint(0, 10**9) for _ in range(200)] + [base + k * 99_999_999 for k in range(50)]
    stamps += [0, 5, 99_999_999, 100_000_000, -7, 2**63 - 1, 10**8 * 12345678901 + 1]
    stamps += sorted(base + rng.randint(0, 10**10) for _ in range(200))
    ints += stamps
    stdin = "".join(f"i {v}\n" for v in ints[: -len(stamps)]) + "".join(f"t {v}\n" for v in stamps)
    stdin += "".join(f"x {h:x} {lo:x}\n" for h, lo in ids)
    stdin += "".join(f"f {struct.unpack('<Q', struct.pack('<d', f))[0]:x}\n" for f in floats)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    expected = [str(v) for v in ints] + [f'"{h:016x}{lo:016x}"' for h, lo in ids]
    assert lines[: len(expected)] == expected
    written = lines[len(expected) :]
    assert len(written) == len(floats)
    for text, f in zip(written, floats, strict=True):
        assert json.loads(text) == f and math.copysign(1, json.loads(text)) == math.copysign(1, f), (text, f)
        assert len(text) <= len(repr(f)) + 2, (text, f)  # near-shortest, as Grisu2 is
