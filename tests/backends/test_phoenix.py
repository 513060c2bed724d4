"""The service demo (examples/service) end to end: one trace from the client to the Cirron scopes.

The demo's server (FastAPI + the official OpenTelemetry instrumentation, `ci.profile()` joining its
SDK TracerProvider) and client (requests + its official instrumentation) run as real programs. Their
spans go over OTLP to

- an in-process receiver (tests/support/otlp_receivers.py), over gRPC and over HTTP: always runs;
- Arize Phoenix, a second, independent backend, started on loopback and read back through its REST
  API: skipped, with the reason, only where `arize-phoenix` is not installed (a failure under
  CI=true: the test is marked `real_backend`, see tests/conftest.py).

Either way the same trace must come back: the client's `demo-session` span, its HTTP client spans,
the server's request spans under them, and the Cirron `load` / `predict` scopes under those, with
point marks as events, summary marks and scope attrs as attributes, and the failed scope in error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.otlp_receivers import GrpcReceiver, HttpReceiver, SpanDict

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "examples" / "service" / "server.py"
CLIENT = ROOT / "examples" / "service" / "client.py"
N_REQUESTS = 3  # good /predict calls; the client adds one GET /model and one malformed /predict
ROWS = 5

# OTLP kinds and status codes
INTERNAL, SERVER_KIND, CLIENT_KIND = 1, 2, 3
UNSET, ERROR = "UNSET", "ERROR"


# -- running the demo -----------------------------------------------------------------------------


@dataclass
class DemoRun:
    trace_id: str
    predictions: list[list[float]]  # what the client got back from each good /predict, in order


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CIRRON_", "PHOENIX_"))}
    env.update(extra)
    return env


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no output from {proc.args} within {timeout}s")
    return proc.stdout.readline()


def _stop(proc: subprocess.Popen[str], timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args} did not stop within {timeout}s of SIGTERM") from None


def run_demo(tmp: Path, env: dict[str, str]) -> DemoRun:
    """Server on a free loopback port, the client against it, then SIGTERM to the server. Both must
    exit 0, having flushed their spans (each shuts its TracerProvider down before exiting)."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**env, "CIRRON_OUTPUT_DIR": str(tmp / "cirron")}
    server_err = tmp / "server.stderr"
    with server_err.open("w") as err:
        server = subprocess.Popen(
            [sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            cwd=tmp,
        )
    try:
        line = _read_line(server, 60)
        match = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, f"server said {line!r}; stderr:\n{server_err.read_text()}"
        client = subprocess.run(
            [
                sys.executable,
                str(CLIENT),
                "--url",
                match[1],
                "--requests",
                str(N_REQUESTS),
                "--rows",
                str(ROWS),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
            timeout=120,
        )
    finally:
        server_rc = _stop(server)
    assert server.stdout is not None
    server_out = server.stdout.read()
    server.stdout.close()
    details = (
        f"client stdout:\n{client.stdout}\nclient stderr:\n{client.stderr}\n"
        f"server stderr:\n{server_err.read_text()}"
    )
    assert client.returncode == 0, details
    assert server_rc == 0, details
    assert "server stopped" in server_out, details
    trace_line = re.search(r"^trace ([0-9a-f]{32})$", client.stdout, re.M)
    assert trace_line, details
    predictions = [json.loads(m) for m in re.findall(r"^POST /predict -> 200 (\[.*\])$", client.stdout, re.M)]
    assert len(predictions) == N_REQUESTS and all(len(p) == ROWS for p in predictions), details
    return DemoRun(trace_line[1], predictions)


# -- one span model for both backends -------------------------------------------------------------


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    name: str
    start_ns: int
    end_ns: int
    status: str  # UNSET / OK / ERROR
    status_message: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    kind: int | None = None  # None where the backend does not keep the OTLP kind
    service: str | None = None  # None where the backend does not keep the resource
    scope: str | None = None
    children: list[Span] = field(default_factory=list, repr=False)


def from_receiver(s: SpanDict) -> Span:
    return Span(
        trace_id=s["trace_id"],
        span_id=s["span_id"],
        parent_id=s["parent_span_id"],
        name=s["name"],
        start_ns=s["start_ns"],
        end_ns=s["end_ns"],
        status={0: UNSET, 1: "OK", 2: ERROR}[s["status"]["code"]],
        status_message=s["status"]["message"],
        attributes=s["attributes"],
        events=[(e["name"], e["attributes"]) for e in s["events"]],
        kind=s["kind"],
        service=s["resource"].get("service.name"),
        scope=s["scope"]["name"],
    )


def _ns(iso: str) -> int:
    t = datetime.fromisoformat(iso)
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000


def from_phoenix(s: dict[str, Any]) -> Span:
    return Span(
        trace_id=s["context"]["trace_id"],
        span_id=s["context"]["span_id"],
        parent_id=s["parent_id"] or "",
        name=s["name"],
        start_ns=_ns(s["start_time"]),
        end_ns=_ns(s["end_time"]),
        status=s["status_code"],
        status_message=s["status_message"] or "",
        attributes=s["attributes"],
        events=[(e["name"], e["attributes"]) for e in s["events"]],
    )


def expected_span_count() -> int:
    calls = N_REQUESTS + 2  # GET /model, the good POSTs, the malformed POST
    # demo-session + a client span, a server span and a `load` scope per call + a `predict` per POST
    return 1 + 3 * calls + (N_REQUESTS + 1)


def check_trace(spans: list[Span], run: DemoRun) -> None:
    """The whole trace: structure, parent links, timing, marks, attributes, the failed scope."""
    trace = [s for s in spans if s.trace_id == run.trace_id]
    by_id = {s.span_id: s for s in trace}
    assert len(by_id) == len(trace) == expected_span_count(), sorted(s.name for s in trace)
    for s in trace:
        if s.parent_id:
            assert s.parent_id in by_id, f"{s.name}: parent {s.parent_id} is not in the trace"
            parent = by_id[s.parent_id]
            parent.children.append(s)
            assert parent.start_ns <= s.start_ns <= s.end_ns, (parent, s)
            # Within a process a child ends before its parent; across the HTTP hop the server may
            # end its request span just after the client got the response and ended its own.
            if "http.route" not in s.attributes:
                assert s.end_ns <= parent.end_ns, (parent, s)
    roots = [s for s in trace if not s.parent_id]
    assert [r.name for r in roots] == ["demo-session"]
    root = roots[0]
    assert root.attributes["demo.requests"] == N_REQUESTS
    assert root.attributes["demo.failures"] == 0

    # client: one HTTP client span per call, each the parent of exactly one server request span
    assert sorted(c.name for c in root.children) == ["GET"] + ["POST"] * (N_REQUESTS + 1)
    server_spans = []
    for http_client in root.children:
        assert http_client.kind in (None, CLIENT_KIND)
        assert http_client.service in (None, "cirron-demo-client")
        assert len(http_client.children) == 1, http_client
        request = http_client.children[0]
        route = "/model" if http_client.name == "GET" else "/predict"
        assert request.name == f"{http_client.name} {route}"
        assert request.attributes["http.route"] == route
        assert request.kind in (None, SERVER_KIND)
        assert request.service in (None, "cirron-demo-server")
        server_spans.append(request)

    # server: Cirron scopes are the request spans' children
    loads, predicts = [], []
    for request in server_spans:
        names = [c.name for c in sorted(request.children, key=lambda c: c.start_ns)]
        assert names == (["load"] if request.name == "GET /model" else ["load", "predict"]), names
        for scope in request.children:
            assert scope.kind in (None, INTERNAL)
            assert scope.service in (None, "cirron-demo-server")  # the service's own resource
            assert scope.scope in (None, "cirron_otel")
            assert re.fullmatch(r"[0-9a-f]{32}", scope.attributes["cirron.span_id"])
            assert scope.attributes["cirron.span_id"][:16] == scope.span_id
            assert scope.attributes["model"] == "ridge"
            assert not scope.children
            (loads if scope.name == "load" else predicts).append(scope)

    # `load`: a scope attr set while open, a point mark, a summary mark
    first = min(loads, key=lambda s: s.start_ns)
    assert first.parent_id == next(r.span_id for r in server_spans if r.name == "GET /model")
    for load in loads:
        assert load.status == UNSET
        assert load.attributes["cached"] is (load is not first)
        assert 0.05 < load.attributes["cirron.summary.train_rmse"] < 0.2
        [(name, attrs)] = load.events
        assert name == "weights_norm"
        assert attrs["cirron.mark.kind"] == "point"
        assert 3.5 < attrs["cirron.mark.value"] < 4.5  # |(1.5, -2, 0.5, 3)| = 3.97
        assert re.fullmatch(r"[0-9a-f]{32}", attrs["cirron.mark.id"])

    # `predict`: one point mark per prediction (the values the client received), the mean as a summary
    good = sorted((p for p in predicts if p.status != ERROR), key=lambda s: s.start_ns)
    bad = [p for p in predicts if p.status == ERROR]
    assert len(good) == N_REQUESTS and len(bad) == 1
    for span, answer in zip(good, run.predictions, strict=True):
        assert span.attributes["rows"] == ROWS
        assert [name for name, _ in span.events] == ["prediction"] * ROWS
        values = [attrs["cirron.mark.value"] for _, attrs in span.events]
        assert values == pytest.approx(answer, rel=1e-12)
        assert all(attrs["cirron.mark.kind"] == "point" for _, attrs in span.events)
        assert span.attributes["cirron.summary.mean_prediction"] == pytest.approx(sum(answer) / ROWS)
        assert not any(k.startswith("error") for k in span.attributes)

    # the malformed request: the scope closed by the exception is in error, the request answered 422
    [failed] = bad
    message = "expected rows of 4 features, got shape (1, 2)"
    assert failed.status_message == message
    # over OTLP a failed scope is the ERROR status (with the message) + error.type; the spool's
    # `error` / `error.message` attrs are not exported as attributes
    assert "error" not in failed.attributes and "error.message" not in failed.attributes
    assert failed.attributes["error.type"] == "ValueError"
    assert failed.attributes["rows"] == 1
    [(event, attrs)] = failed.events
    assert event == "exception"
    assert attrs["exception.type"] == "ValueError"
    assert attrs["exception.message"] == message
    assert "server.py" in attrs["exception.stacktrace"]
    assert (
        by_id[failed.parent_id].attributes.get(
            "http.status_code", by_id[failed.parent_id].attributes.get("http.response.status_code")
        )
        == 422
    )


# -- against the in-process receivers -------------------------------------------------------------


# real_backend: the demo's real FastAPI/uvicorn service (the test extra, not test-core)
@pytest.mark.real_backend
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_service_demo_one_trace(protocol: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    receiver: GrpcReceiver | HttpReceiver = request.getfixturevalue(
        "grpc_receiver" if protocol == "grpc" else "http_receiver"
    )
    env = _clean_env(OTEL_EXPORTER_OTLP_PROTOCOL=protocol, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
    run = run_demo(tmp_path, env)
    received = [from_receiver(s) for s in receiver.spans()]  # both programs flushed before exiting
    check_trace(received, run)
    # The Cirron session span ends at shutdown and is a trace of its own (the default trace shape).
    [session] = [s for s in received if s.name == "cirron.session"]
    assert session.trace_id != run.trace_id
    assert session.service == "cirron-demo-server"
    assert len(received) == expected_span_count() + 1


# -- Arize Phoenix ------------------------------------------------------------------------------

# Phoenix binds its OTLP gRPC receiver to [::] whatever PHOENIX_HOST says; these tests keep every
# listener on loopback, so its gRPC server is started with the address rewritten.
_PHOENIX_LAUNCHER = """
import sys
from grpc.aio import _server

_add_insecure_port = _server.Server.add_insecure_port

def _loopback(self, address):
    return _add_insecure_port(self, address.replace("[::]", "127.0.0.1"))

_server.Server.add_insecure_port = _loopback
sys.argv = ["phoenix", "serve"]
from phoenix.server.main import main
main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Phoenix:
    url: str
    log: Path

    def get(self, path: str, **query: Any) -> Any:
        url = f"{self.url}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)

    def spans(self, project: str, trace_id: str) -> list[dict[str, Any]]:
        spans: list[dict[str, Any]] = []
        cursor = None
        while True:
            query: dict[str, Any] = {"trace_id": trace_id, "limit": 1000}
            if cursor:
                query["cursor"] = cursor
            page = self.get(f"/v1/projects/{urllib.parse.quote(project)}/spans", **query)
            spans.extend(page["data"])
            cursor = page.get("next_cursor")
            if not cursor:
                return spans


@pytest.fixture(scope="session")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phoenix]:
    """Arize Phoenix on 127.0.0.1 (HTTP and gRPC on free ports), its database in a temp dir."""
    spec = importlib.util.find_spec("phoenix")  # without importing it (that takes seconds)
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "server" / "main.py").exists():
        pytest.skip("arize-phoenix is not installed (pip install arize-phoenix)")
    work = tmp_path_factory.mktemp("phoenix")
    port = _free_port()
    env = _clean_env(
        PHOENIX_WORKING_DIR=str(work),
        PHOENIX_HOST="127.0.0.1",
        PHOENIX_PORT=str(port),
        PHOENIX_GRPC_PORT=str(_free_port()),
        PHOENIX_TELEMETRY_ENABLED="false",
        PHOENIX_ALLOW_EXTERNAL_RESOURCES="false",  # no requests of its own to the internet
        PHOENIX_LOG_MIGRATIONS="false",
    )
    log = work / "phoenix.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _PHOENIX_LAUNCHER], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work
        )
    server = Phoenix(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Phoenix exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{server.url}/healthz", timeout=2) as response,
            ):
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"Phoenix did not come up within 120s:\n{log.read_text()[-4000:]}")
            time.sleep(0.25)
        yield server
    finally:
        _stop(proc)


@pytest.mark.real_backend
def test_phoenix_one_trace(phoenix: Phoenix, tmp_path: Path) -> None:
    project = f"cirron-demo-{uuid.uuid4().hex[:8]}"  # Phoenix files spans by this resource attribute
    env = _clean_env(
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{phoenix.url}/v1/traces",
        OTEL_RESOURCE_ATTRIBUTES=f"openinference.project.name={project}",
    )
    run = run_demo(tmp_path, env)
    # Phoenix accepts OTLP at once and inserts in the background: poll until the trace is complete.
    deadline = time.monotonic() + 30
    stored: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(urllib.error.HTTPError):  # 404 until the project exists
            stored = phoenix.spans(project, run.trace_id)
        if len(stored) >= expected_span_count():
            break
        time.sleep(0.25)
    assert len(stored) == expected_span_count(), (
        f"{len(stored)} spans of trace {run.trace_id} in Phoenix:\n{phoenix.log.read_text()[-4000:]}"
    )
    check_trace([from_phoenix(s) for s in stored], run)
    # The project holds the Cirron session span too, in its own trace.
    while not (sessions := phoenix.get(f"/v1/projects/{project}/spans", name="cirron.session")["data"]):
        assert time.monotonic() < deadline, "no cirron.session span in Phoenix"
        time.sleep(0.25)
    assert len(sessions) == 1 and sessions[0]["context"]["trace_id"] != run.trace_id
