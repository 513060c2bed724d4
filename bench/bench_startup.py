"""Start-up cost of `import cirron_otel as ci; ci.profile(output="spool")`.

Fresh interpreters, cases interleaved (so machine load hits every case alike), a warm-up
round first. Bytecode is cached under a temporary PYTHONPYCACHEPREFIX even when
PYTHONDONTWRITEBYTECODE is set, as in an installed package. Reports, per source tree, the
in-process time of the import plus `profile()` and the whole process against a bare
interpreter (which also includes the exit: the final flush and fsync).

    python bench/bench_startup.py                       # the installed cirron_otel
    python bench/bench_startup.py -n 30 before=@HEAD~1 after=@HEAD now=src
    python bench/bench_startup.py -n 30 old=/tmp/old/src

A tree is `label=DIR` (put first on PYTHONPATH: it must hold `cirron_otel/exporters` too, or
the editable install's own `exporters/` is imported with it) or `label=@REV`: `src/` and
`exporters/` at that git revision, laid out as installed, with the native module built in
this work tree (so revisions that differ in the C units are not comparable this way).
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROFILE = (
    "import time, sys; t = time.perf_counter(); import cirron_otel as ci; ci.profile(output='spool'); "
    "sys.stderr.write(f'{(time.perf_counter() - t) * 1e3:.3f} '"
    'f\'{sum(m.split(".")[0] == "opentelemetry" for m in sys.modules)}\\n\')'
)


def tree_at_revision(rev: str, dest: str) -> str:
    """`src/` and `exporters/` at git revision `rev` under `dest`, exporters inside the package
    as in a wheel, plus this work tree's built native module; returns the directory for
    PYTHONPATH."""
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", rev, "src", "exporters"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    package = os.path.join(dest, "src", "cirron_otel")
    os.rename(os.path.join(dest, "exporters"), os.path.join(package, "exporters"))
    for native in glob.glob(os.path.join(ROOT, "src", "cirron_otel", "_native*.so")):
        shutil.copy(native, package)
    return os.path.join(dest, "src")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=20, help="processes per case (default 20)")
    parser.add_argument("trees", nargs="*", help="label=SRC_DIR (put first on PYTHONPATH) or label=@GIT_REV")
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.trees) or {"installed": ""}
    with tempfile.TemporaryDirectory() as tmp:
        for label, src in trees.items():
            if src.startswith("@"):
                trees[label] = tree_at_revision(src[1:], os.path.join(tmp, "trees", label))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env.update(CIRRON_OUTPUT_DIR=tmp, PYTHONPYCACHEPREFIX=os.path.join(tmp, "pyc"))
        env = {k: v for k, v in env.items() if not k.startswith("OTEL_")}  # spool only, as asked
        cases: dict[str, tuple[str, str]] = {"bare": ("", "pass")}
        cases.update({label: (src, PROFILE) for label, src in trees.items()})
        whole: dict[str, list[float]] = {k: [] for k in cases}
        inproc: dict[str, list[float]] = {k: [] for k in trees}
        otel: dict[str, int] = {}
        for round_ in range(args.n + 1):
            for label, (src, code) in cases.items():
                case_env = {**env, "PYTHONPATH": src} if src else env
                start = time.perf_counter()
                proc = subprocess.run(
                    [sys.executable, "-c", code],
                    env=case_env,
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=120,
                )
                elapsed = (time.perf_counter() - start) * 1e3
                if round_ == 0:
                    continue  # warm-up: fills the bytecode cache
                whole[label].append(elapsed)
                if label in inproc:
                    ms, n_otel = proc.stderr.split()[-2:]
                    inproc[label].append(float(ms))
                    otel[label] = int(n_otel)
    bare = statistics.median(whole["bare"])
    print(f"Python {sys.version.split()[0]}, {args.n} processes per case; bare interpreter: {bare:.1f} ms")
    for label in trees:
        w, i = statistics.median(whole[label]), inproc[label]
        print(
            f"{label}: import + profile() {statistics.median(i):.1f} ms median (min {min(i):.1f}); "
            f"whole process {w:.1f} ms (+{w - bare:.1f} over bare, exit included); "
            f"opentelemetry modules imported: {otel[label]}"
        )


if __name__ == "__main__":
    main()
