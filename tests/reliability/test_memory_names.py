"""A distinct mark or scope name costs its bytes plus a small constant.

Each name used to keep the 4 KiB scratch buffer its JSON token was escaped into (262,144
names: about 1.1 GiB). Measured as RSS in a fresh interpreter: first the same number of
records under one name (so buffers that every run needs reach their size), then the same
workload over distinct names; the difference per name is the name's own cost.
"""

from __future__ import annotations

import json

import pytest

from tests.support.helpers import run_script

N = 100_000
NAME_LEN = 8  # "n0000000"
# what a name legitimately costs: its str object (kept as the id table's key), the dict and
# list entries, the id, the table entry and one exact-size token; measured ~150 bytes
BOUND = 300 + NAME_LEN


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["mark", "scope"])
def test_each_distinct_name_costs_its_bytes_plus_a_small_constant(out, kind: str) -> None:
    r = run_script(
        f"""
        import gc, json, cirron_otel as ci

        def rss():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

        ci.profile(output_dir={str(out)!r}, flush_interval=0.2, install_signal_handlers=False,
                   trace_buffer_records=1000, spool_max_bytes=20_000_000, output="spool")
        names = [f"n{{i:07d}}" for i in range({N})]
        assert len(names[0]) == {NAME_LEN}

        def run(name_of):
            for i in range({N}):
                if {kind!r} == "scope":
                    with ci.scope(name_of(i)):
                        pass
                else:
                    ci.mark(name_of(i), 1.0)
                if i % 20_000 == 0:
                    ci.flush()
            assert ci.flush()
            gc.collect()

        for _ in range(2):
            run(lambda i: "same")
        before = rss()
        run(names.__getitem__)
        after = rss()
        names_now = ci._native.stats()["names"]
        ci.shutdown()
        print(json.dumps({{"per_name": (after - before) / {N}, "names": names_now}}))
        """,
        timeout=280,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["names"] >= N  # every name really was interned
    assert res["per_name"] < BOUND, f"{res['per_name']:.0f} bytes per distinct {kind} name"
