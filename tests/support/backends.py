"""Real tracing and metrics backends for tests/backends/ (test_backends.py, test_metrics_stack.py).

The Jaeger v2, OpenTelemetry Collector and Prometheus binaries come from
scripts/backends/build.sh (which caches them); they run here on 127.0.0.1, on free ports, with
the very config files that docker-compose.yml mounts (deploy/jaeger/config.yaml,
deploy/collector/config.yaml, which read their listen addresses and ports from environment
variables, defaults: the compose values; deploy/prometheus/prometheus.yml with the compose
service's flags, its listen address and storage given on the command line).
Every process started here is this test run's own child: stopped by its pid in the fixtures'
teardown, at interpreter exit as a fallback, and by the kernel (PR_SET_PDEATHSIG) if the test
process dies first. Also: small clients for Jaeger's and Prometheus's HTTP APIs, and a reader
for the collector's `${env:VAR:-default}` expansions.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
BUILD_SH = ROOT / "scripts" / "backends" / "build.sh"
COMPOSE_FILE = ROOT / "docker-compose.yml"
JAEGER_CONFIG = ROOT / "deploy" / "jaeger" / "config.yaml"
COLLECTOR_CONFIG = ROOT / "deploy" / "collector" / "config.yaml"
COLLECTOR_MANIFEST = ROOT / "deploy" / "collector" / "builder.yaml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
HOST = "127.0.0.1"
# A first build on a fresh machine takes 5 to 10 minutes (scripts/backends/README.md).
BUILD_TIMEOUT = 1800.0
START_TIMEOUT = 60.0

# Variables of the backends' configs, and the OpenTelemetry ones, never inherited by a child.
_SCRUB = re.compile(r"^(OTEL_|JAEGER_|COLLECTOR_|TEMPO_)")


class BackendUnavailable(Exception):
    """A backend binary cannot be had on this machine (no Go toolchain and nothing cached)."""


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _SCRUB.match(k) and k != "CIRRON_OUTPUT_DIR"}
    env.update(extra or {})
    return env


# -- binaries -------------------------------------------------------------------------------


def _cache_dir() -> Path:
    return Path(os.environ.get("CIRRON_BACKENDS_CACHE") or Path.home() / ".cache/cirron-otel/backends")


def _platform() -> str:
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
    return f"{platform.system().lower()}-{arch}"


def jaeger_version() -> str:
    """The jaegertracing/jaeger image tag in docker-compose.yml (what build.sh builds)."""
    m = re.search(r"image:\s*jaegertracing/jaeger:(\d+\.\d+\.\d+)", COMPOSE_FILE.read_text())
    assert m, "no jaegertracing/jaeger:<version> image in docker-compose.yml"
    return m.group(1)


def prometheus_version() -> str:
    """The prom/prometheus image tag in docker-compose.yml, without its "v" (what build.sh builds)."""
    m = re.search(r"image:\s*prom/prometheus:v(\d+\.\d+\.\d+)", COMPOSE_FILE.read_text())
    assert m, "no prom/prometheus:v<version> image in docker-compose.yml"
    return m.group(1)


_BIN_VARIABLE = {"jaeger": "JAEGER_BIN", "collector": "OTELCOL_BIN", "prometheus": "PROMETHEUS_BIN"}


def cached_binary(what: str) -> Path | None:
    """Where build.sh caches `what` ("jaeger", "collector" or "prometheus"), when it is there."""
    cache, plat = _cache_dir(), _platform()
    if what == "jaeger":
        path = cache / "jaeger" / f"{jaeger_version()}-{plat}" / "jaeger"
    elif what == "prometheus":
        path = cache / "prometheus" / f"{prometheus_version()}-{plat}" / "prometheus"
    else:
        raw = COLLECTOR_MANIFEST.read_bytes()
        version = yaml.safe_load(raw)["dist"]["version"]
        digest = hashlib.sha256(raw).hexdigest()[:12]
        path = cache / "otelcol" / f"{version}-{digest}-{plat}" / "otelcol-cirron"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def get_binary(what: str) -> Path:
    """The binary of `what` ("jaeger", "collector" or "prometheus"): built (or found in its cache) by
    scripts/backends/build.sh when Go is on PATH, else taken from that cache."""
    if shutil.which("go") is None:
        found = cached_binary(what)
        if found is not None:
            return found
        raise BackendUnavailable(
            f"the Go toolchain is not on PATH and no cached {what} binary is under {_cache_dir()}: "
            f"install Go to let scripts/backends/build.sh build it (see scripts/backends/README.md)"
        )
    started = time.monotonic()
    r = subprocess.run(
        ["bash", str(BUILD_SH), what],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        env=clean_env(),
    )
    if r.returncode != 0:
        raise RuntimeError(
            f"scripts/backends/build.sh {what} failed (exit {r.returncode}):\n{r.stderr[-4000:]}"
        )
    values = {}
    for line in r.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = shlex.split(value)[0] if value else ""
    binary = Path(values[_BIN_VARIABLE[what]])
    assert binary.is_file(), f"build.sh printed {binary}, which does not exist"
    elapsed = time.monotonic() - started
    if elapsed > 5:
        print(f"[backends] build.sh {what}: {elapsed:.0f} s")
    return binary


# -- processes ------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free on HOST a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:  # runs in the child, before exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_RUNNING: set[Backend] = set()


def _stop_all() -> None:
    for backend in list(_RUNNING):
        backend.stop()


atexit.register(_stop_all)


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


class Backend:
    """One backend process on loopback: `ports` are chosen free, `env_for(ports)` configures
    it, `ready_paths(ports)` are the URLs that answer 200 once it is ready."""

    name = "backend"
    port_names: tuple[str, ...] = ()

    def __init__(self, binary: Path, config: Path, run_dir: Path, name: str | None = None) -> None:
        self.binary, self.config, self.run_dir = binary, config, run_dir
        self.name = name or self.name
        self.log_path = run_dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    def env_for(self, ports: dict[str, int]) -> dict[str, str]:
        raise NotImplementedError

    def ready_urls(self, ports: dict[str, int]) -> list[str]:
        raise NotImplementedError

    def args(self, ports: dict[str, int]) -> list[str]:
        """The command line after the binary."""
        return [f"--config={self.config}"]

    def start(self, attempts: int = 3) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            self.ports = dict(zip(self.port_names, free_ports(len(self.port_names)), strict=True))
            with open(self.log_path, "ab") as log:
                log.write(f"--- start attempt {attempt + 1}, ports {self.ports}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    [str(self.binary), *self.args(self.ports)],
                    cwd=ROOT,
                    env=clean_env(self.env_for(self.ports)),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
            _RUNNING.add(self)
            if self._wait_ready():
                return
            self.stop()
            if "address already in use" not in self.log_tail(200):  # lost a port race: retry
                break
        raise RuntimeError(f"{self.name} did not become ready ({self.log_path}):\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        for url in self.ready_urls(self.ports):
            while http_status(url) != 200:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    return False
                time.sleep(0.1)
        return True

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _RUNNING.discard(self)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Jaeger(Backend):
    """Jaeger v2 all-in-one with deploy/jaeger/config.yaml (in-memory storage)."""

    name = "jaeger"
    port_names = ("otlp_grpc", "otlp_http", "query_http", "query_grpc", "health")

    def __init__(self, binary: Path, run_dir: Path, name: str | None = None) -> None:
        super().__init__(binary, JAEGER_CONFIG, run_dir, name)

    def env_for(self, ports: dict[str, int]) -> dict[str, str]:
        return {
            "JAEGER_LISTEN_HOST": HOST,
            "JAEGER_OTLP_GRPC_PORT": str(ports["otlp_grpc"]),
            "JAEGER_OTLP_HTTP_PORT": str(ports["otlp_http"]),
            "JAEGER_QUERY_HTTP_PORT": str(ports["query_http"]),
            "JAEGER_QUERY_GRPC_PORT": str(ports["query_grpc"]),
            "JAEGER_HEALTH_PORT": str(ports["health"]),
        }

    def ready_urls(self, ports: dict[str, int]) -> list[str]:
        return [
            f"http://{HOST}:{ports['health']}/status",
            f"http://{HOST}:{ports['query_http']}/api/services",
        ]

    @property
    def query_url(self) -> str:
        return f"http://{HOST}:{self.ports['query_http']}"

    @property
    def otlp_grpc_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['otlp_grpc']}"

    @property
    def otlp_http_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['otlp_http']}"

    @property
    def otlp_grpc_target(self) -> str:
        return f"{HOST}:{self.ports['otlp_grpc']}"

    def services(self) -> list[str]:
        return get_json(f"{self.query_url}/api/services")["data"] or []

    def traces(self, service: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"service": service, "limit": 1000, "lookback": "1h"})
        return get_json(f"{self.query_url}/api/traces?{query}")["data"] or []

    def wait_for_traces(
        self,
        service: str,
        complete: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 30.0,
        settle: float = 0.6,
    ) -> list[dict[str, Any]]:
        """Poll until `complete(traces)`; then once more after `settle` seconds (longer than the
        config's 200 ms batch timeout), so that late duplicates would show too."""
        deadline = time.monotonic() + timeout
        traces: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            traces = self.traces(service)
            if complete(traces):
                time.sleep(settle)
                return self.traces(service)
            time.sleep(0.2)
        shape = sorted(len(t["spans"]) for t in traces)
        raise AssertionError(
            f"Jaeger ({self.name}) did not get the expected traces of {service!r} within {timeout} s: "
            f"{len(traces)} traces, span counts {shape}\n--- {self.name} log:\n{self.log_tail()}"
        )


class Collector(Backend):
    """The ocb-built collector with deploy/collector/config.yaml (or `config`, a variant of it),
    exporting traces over OTLP/gRPC to `jaeger_target` and `tempo_target` (host:port) and, when
    given, metrics over OTLP/HTTP to `prometheus_otlp_url` (Prometheus's .../api/v1/otlp): the
    compose pipelines, exporters included."""

    name = "collector"
    port_names = ("otlp_grpc", "otlp_http", "health", "metrics")

    def __init__(
        self,
        binary: Path,
        run_dir: Path,
        jaeger_target: str,
        tempo_target: str,
        prometheus_otlp_url: str | None = None,
        config: Path = COLLECTOR_CONFIG,
        name: str | None = None,
    ) -> None:
        super().__init__(binary, config, run_dir, name)
        self.jaeger_target, self.tempo_target = jaeger_target, tempo_target
        self.prometheus_otlp_url = prometheus_otlp_url

    def env_for(self, ports: dict[str, int]) -> dict[str, str]:
        # COLLECTOR_TRACES_EXPORTERS is left unset: the default, [otlp_grpc/jaeger, otlp_grpc/tempo].
        return {
            "COLLECTOR_LISTEN_HOST": HOST,
            "COLLECTOR_OTLP_GRPC_PORT": str(ports["otlp_grpc"]),
            "COLLECTOR_OTLP_HTTP_PORT": str(ports["otlp_http"]),
            "COLLECTOR_HEALTH_PORT": str(ports["health"]),
            "COLLECTOR_METRICS_PORT": str(ports["metrics"]),
            "JAEGER_OTLP_ENDPOINT": self.jaeger_target,
            "TEMPO_OTLP_ENDPOINT": self.tempo_target,
            **({"PROMETHEUS_OTLP_ENDPOINT": self.prometheus_otlp_url} if self.prometheus_otlp_url else {}),
        }

    def ready_urls(self, ports: dict[str, int]) -> list[str]:
        return [f"http://{HOST}:{ports['health']}/"]

    @property
    def otlp_grpc_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['otlp_grpc']}"

    @property
    def otlp_http_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['otlp_http']}"


class Prometheus(Backend):
    """Prometheus with deploy/prometheus/prometheus.yml and the flags docker-compose.yml gives
    it (the OTLP receiver, exemplar storage), on loopback, its TSDB in the run dir."""

    name = "prometheus"
    port_names = ("web",)

    def __init__(self, binary: Path, run_dir: Path, flags: list[str], name: str | None = None) -> None:
        super().__init__(binary, PROMETHEUS_CONFIG, run_dir, name)
        self.flags = flags

    def env_for(self, ports: dict[str, int]) -> dict[str, str]:
        return {}

    def args(self, ports: dict[str, int]) -> list[str]:
        """The compose flags, with the config, the storage and the listen address of this run."""
        local = {
            "--config.file": str(self.config),
            "--storage.tsdb.path": str(self.run_dir / f"{self.name}-data"),
            "--web.listen-address": f"{HOST}:{ports['web']}",
        }
        kept = [f for f in self.flags if f.split("=", 1)[0] not in local]
        return [f"{k}={v}" for k, v in local.items()] + kept

    def ready_urls(self, ports: dict[str, int]) -> list[str]:
        return [f"http://{HOST}:{ports['web']}/-/ready"]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.ports['web']}"

    @property
    def otlp_url(self) -> str:
        """The OTLP base URL, as the collector's otlp_http exporter takes it (it adds /v1/metrics)."""
        return f"{self.url}/api/v1/otlp"

    def api(self, path: str, **params: str | float | list[str]) -> Any:
        """GET /api/v1/<path>?params (a list value repeats the parameter); the `data` of a
        successful answer, else an AssertionError with Prometheus's error."""
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            body = get_json(f"{self.url}/api/v1/{path}?{query}", timeout=30.0)
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:2000]
            raise AssertionError(f"Prometheus /api/v1/{path}?{query}: {exc.code} {detail!r}") from None
        assert body.get("status") == "success", body
        return body["data"]


# -- config files ---------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def with_env_defaults(node: Any, env: Mapping[str, str] | None = None) -> Any:
    """A parsed collector/Jaeger config with every `${env:VAR:-default}` expanded as the
    collector does (from `env`, default: no variables set, i.e. the compose values). A value
    that is one whole reference is parsed as YAML (so a list default becomes a list)."""
    env = env or {}
    if isinstance(node, dict):
        return {k: with_env_defaults(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [with_env_defaults(v, env) for v in node]
    if isinstance(node, str) and "${" in node:
        whole = _ENV_REF.fullmatch(node)
        if whole:
            return yaml.safe_load(env.get(whole.group(1), whole.group(2) or ""))
        return _ENV_REF.sub(lambda m: env.get(m.group(1), m.group(2) or ""), node)
    return node


def load_config(path: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    return with_env_defaults(yaml.safe_load(path.read_text()), env)


def host_port(endpoint: str) -> tuple[str, int]:
    """'0.0.0.0:4317', 'jaeger:4317', 'http://localhost:4318/v1/traces' -> (host, port)."""
    if "://" not in endpoint:
        endpoint = "//" + endpoint
    parsed = urllib.parse.urlsplit(endpoint)
    assert parsed.hostname and parsed.port, f"no host:port in {endpoint!r}"
    return parsed.hostname, parsed.port


def compose_published(service: dict[str, Any]) -> dict[int, int]:
    """{host port: container port} of a compose service's `ports` (short or long syntax)."""
    out: dict[int, int] = {}
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            out[int(entry["published"])] = int(entry["target"])
            continue
        spec = str(entry).split("/")[0]  # drop /tcp
        parts = spec.split(":")
        assert len(parts) in (2, 3), f"a published port needs host:container, got {entry!r}"
        out[int(parts[-2])] = int(parts[-1])
    return out
