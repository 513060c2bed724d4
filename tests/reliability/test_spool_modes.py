"""Spool and outbox files are readable by the user only (0600, directories 0700), whatever
the umask; `file_mode="group"` (or CIRRON_FILE_MODE=group) gives 0640 / 0750; a directory
that already exists keeps its mode."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cirron_otel.exporters import spool_dir as spool_dir_mod
from cirron_otel.exporters.spool_dir import SpoolDirectory

import cirron_otel as ci
from tests.support.helpers import read_spool, run_script

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::cirron_otel.CirronWarning")]


def _mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o000, 0o022, 0o077], ids=lambda u: f"umask{u:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.fixture(autouse=True)
def _default_mode_restored() -> Iterator[None]:
    yield
    spool_dir_mod.set_default_file_mode("user")


def _record(out: Path, **options: object) -> None:
    ci.profile(output_dir=str(out), flush_interval=60, install_signal_handlers=False, **options)
    with ci.scope("s", secret="attr"):
        ci.mark("m", 1)
    assert ci.flush(timeout=30)
    ci.shutdown()


@pytest.mark.parametrize(
    ("options", "file_perm", "dir_perm"),
    [({}, 0o600, 0o700), ({"file_mode": "group"}, 0o640, 0o750)],
    ids=["user", "group"],
)
def test_spool_files_and_directories_modes(tmp_path, umask, options, file_perm, dir_perm):
    out = tmp_path / "a" / "b" / "cirron"  # parents created too
    _record(out, **options)
    files = list((out / "spool").iterdir())
    assert files and read_spool(out)
    assert {oct(_mode(f)) for f in files} == {oct(file_perm)}
    for d in (out / "spool", out, out.parent, out.parent.parent):
        assert oct(_mode(d)) == oct(dir_perm), d


def test_existing_directories_keep_their_mode(tmp_path, umask):
    out = tmp_path / "cirron"
    (out / "spool").mkdir(parents=True)
    os.chmod(out, 0o755)
    os.chmod(out / "spool", 0o775)
    _record(out)
    assert oct(_mode(out)) == oct(0o755) and oct(_mode(out / "spool")) == oct(0o775)
    assert {oct(_mode(f)) for f in (out / "spool").iterdir()} == {oct(0o600)}


@pytest.mark.parametrize(("mode", "file_perm", "dir_perm"), [("user", 0o600, 0o700), ("group", 0o640, 0o750)])
def test_outbox_follows_the_profile_file_mode(tmp_path, umask, mode, file_perm, dir_perm):
    # The OTLP sink builds its outbox as SpoolDirectory(dir, cap, subdir=..., suffix=".pb")
    # without a mode: it gets the one profile() set.
    spool_dir_mod.set_default_file_mode(mode)
    d = SpoolDirectory(tmp_path / "cirron", 10**9, subdir="otlp-outbox", suffix=".pb")
    d.write_bytes("00000000000000000001-x-1.pb", b"\x0a\x00")
    assert oct(_mode(d.path)) == oct(dir_perm)
    assert oct(_mode(tmp_path / "cirron")) == oct(dir_perm)
    assert oct(_mode(os.path.join(d.path, "00000000000000000001-x-1.pb"))) == oct(file_perm)


def test_profile_sets_the_outbox_mode(tmp_path):
    _record(tmp_path / "o1", file_mode="group")
    assert spool_dir_mod._default_file_mode == "group"
    _record(tmp_path / "o2")
    assert spool_dir_mod._default_file_mode == "user"


def test_environment_variable_selects_group_mode(tmp_path):
    out = tmp_path / "cirron"
    r = run_script(
        f"""
        import os
        os.umask(0o077)
        import cirron_otel as ci
        ci.profile(output_dir={str(out)!r}, install_signal_handlers=False)
        ci.mark("m", 1)
        ci.shutdown()
    """,
        env={"CIRRON_FILE_MODE": "group"},
    )
    assert r.returncode == 0, r.stderr
    assert oct(_mode(out)) == oct(0o750) and oct(_mode(out / "spool")) == oct(0o750)
    assert {oct(_mode(f)) for f in (out / "spool").iterdir()} == {oct(0o640)}


@pytest.mark.parametrize(("mode", "file_perm", "dir_perm"), [("user", 0o600, 0o700), ("group", 0o640, 0o750)])
def test_real_otlp_outbox_files_and_directory(tmp_path, mode, file_perm, dir_perm, monkeypatch):
    # A collector that is not there: requests stay in the outbox, with the profile's mode.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "500")
    old = os.umask(0o002)
    try:
        out = tmp_path / "cirron"
        ci.profile(
            output_dir=str(out),
            output="spool,otlp",
            otlp_endpoint="http://127.0.0.1:9",
            file_mode=mode,
            flush_interval=60,
            install_signal_handlers=False,
            shutdown_timeout=2,
        )
        with ci.scope("s"):
            ci.mark("m", 1)
        ci.flush(timeout=2)
        ci.shutdown(timeout=2)
    finally:
        os.umask(old)
    outbox = out / "otlp-outbox"
    requests = list(outbox.glob("*.pb"))
    assert requests, sorted(os.listdir(outbox))
    assert oct(_mode(outbox)) == oct(dir_perm) and oct(_mode(out)) == oct(dir_perm)
    assert {oct(_mode(p)) for p in requests} == {oct(file_perm)}
