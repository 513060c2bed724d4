"""The OTLP transports honour OTEL_EXPORTER_OTLP_[TRACES_]* exactly as the specification says.

Resolution (`_config.otlp_transport_config`) is checked on its own, then end to end against real
receivers: a timeout in milliseconds, TLS with a CA file, mutual TLS against receivers that
require a client certificate, TLS files that cannot be used (refused at profile(), naming the
variable, never an abort) or that go away later (nothing lost), and a broken value that turns
OTLP off with a warning instead of raising into the program.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import warnings
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from cirron_otel.exporters.otlp import make_transport
from cirron_otel.exporters.otlp_transport import PartialSuccess, SendError

import cirron_otel as ci
from cirron_otel._config import otlp_transport_config, resolve
from tests.support.helpers import run_script
from tests.support.otlp_receivers import GrpcReceiver, HttpReceiver
from tests.support.tls import Pki, make_ca, make_client, make_pki

from .test_otlp_delivery import one_span_request

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("OTEL_", "CIRRON_")):
            monkeypatch.delenv(key)


def test_defaults():
    grpc = otlp_transport_config("grpc", None, env={})
    assert (grpc.endpoint, grpc.insecure, grpc.timeout, grpc.compression, grpc.headers) == (
        "localhost:4317",
        True,
        10.0,
        "none",
        (),
    )
    http = otlp_transport_config("http/protobuf", None, env={})
    assert http.endpoint == "http://localhost:4318/v1/traces"


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c/base"}, "https://c/base/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom"}, "http://c:4318/custom"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318"}, "http://c:4318"),  # as is, no path added
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:2/t",
            },
            "http://b:2/t",
        ),
    ],
)
def test_http_endpoint_generic_gets_v1_traces_signal_specific_is_used_as_is(env: dict[str, str], url: str):
    assert otlp_transport_config("http/protobuf", None, env=env).endpoint == url


@pytest.mark.parametrize(
    ("env", "endpoint", "url"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None, "http://c:4318/v1/metrics"),
        (  # the traces' own endpoint is not the metrics'
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/v1/traces",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c",
            },
            None,
            "http://c/v1/metrics",
        ),
        (  # straight to Prometheus: the metrics-specific endpoint as is
            {
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://p:9090/api/v1/otlp/v1/metrics",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
            },
            None,
            "http://p:9090/api/v1/otlp/v1/metrics",
        ),
        ({}, "http://c:4318/v1/traces", "http://c:4318/v1/metrics"),  # profile(otlp_endpoint=...)
        ({}, "http://c:4318", "http://c:4318/v1/metrics"),
        ({}, None, "http://localhost:4318/v1/metrics"),
    ],
)
def test_the_metrics_endpoint_follows_the_same_rules_with_its_own_signal(
    env: dict[str, str], endpoint: str | None, url: str
):
    assert otlp_transport_config("http/protobuf", endpoint, env=env, signal="metrics").endpoint == url


def test_every_metrics_variable_wins_over_the_generic_one_and_not_over_the_traces():
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "a=generic",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "a=metrics",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1000",
        "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": "gzip",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m:4317",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317",
    }
    metrics = otlp_transport_config("grpc", None, env=env, signal="metrics")
    traces = otlp_transport_config("grpc", None, env=env)
    assert (metrics.endpoint, metrics.insecure, metrics.headers) == ("m:4317", True, (("a", "metrics"),))
    assert (metrics.timeout, metrics.compression) == (10.0, "gzip")
    assert (traces.endpoint, traces.insecure, traces.headers) == ("c:4317", False, (("a", "generic"),))
    assert (traces.timeout, traces.compression) == (1.0, "none")


@pytest.mark.parametrize(
    ("kwargs", "env", "on"),
    [
        ({}, {}, False),  # no OTLP: no metrics
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, True),  # on with OTLP
        ({"metrics": False}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, False),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_METRICS_EXPORTER": "none"}, False),
        (
            {"metrics": True},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_METRICS_EXPORTER": "none"},
            True,
        ),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_METRICS_EXPORTER": "otlp"}, True),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}, False),
        (
            {},
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"},
            False,
        ),  # not to a localhost never named
        ({"metrics": True}, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, True),
        (
            {},
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m",
            },
            True,
        ),
        ({"otlp_endpoint": "http://c:4317"}, {}, True),
    ],
)
def test_metrics_are_on_with_otlp_unless_turned_off(kwargs: dict, env: dict[str, str], on: bool):
    assert resolve(env=env, **kwargs).metrics is on


def test_metrics_settings_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match=r"metrics=True.*OTLP, which is off"):
        resolve(env={}, metrics=True)
    with pytest.raises(TypeError, match="metrics must be True, False or None"):
        resolve(env={}, metrics="yes")
    with pytest.raises(TypeError, match="metrics_prefix must be a str"):
        resolve(env={}, metrics_prefix=1)
    with pytest.raises(TypeError, match="metric_attrs must be a list of attribute names"):
        resolve(env={}, metric_attrs="step")  # a str is not a list of names
    assert resolve(env={}, metric_attrs=["split", "split", "model"]).metric_attrs == ("split", "model")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (
            resolve(
                env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_METRICS_EXPORTER": "prometheus"}
            ).metrics
            is False
        )
    assert any("OTEL_METRICS_EXPORTER" in str(w.message) and "prometheus" in str(w.message) for w in caught)


def test_metrics_prefix_and_protocol():
    assert resolve(env={}).metrics_prefix == "cirron.mark."
    assert resolve(env={"CIRRON_METRICS_PREFIX": "train."}).metrics_prefix == "train."
    assert resolve(env={"CIRRON_METRICS_PREFIX": "train."}, metrics_prefix="x.").metrics_prefix == "x."
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf"}
    settings = resolve(env=env)
    assert (settings.otlp_protocol, settings.metrics_protocol) == ("grpc", "http/protobuf")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"):
        resolve(env={**env, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "carrier-pigeon"})


@pytest.mark.parametrize(
    ("env", "target", "insecure"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "c:4317", True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317"}, "c:4317", False),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317", "OTEL_EXPORTER_OTLP_INSECURE": "true"},
            "c:4317",
            False,
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317"}, "c:4317", False),  # schemeless: INSECURE decides, false
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317", "OTEL_EXPORTER_OTLP_INSECURE": "TRUE"}, "c:4317", True),
        (
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "c:1",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "false",
            },
            "c:1",
            False,
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://b:2",
            },
            "b:2",
            False,
        ),
    ],
)
def test_grpc_endpoint_scheme_decides_tls_and_insecure_applies_to_schemeless(
    env: dict[str, str], target: str, insecure: bool
):
    config = otlp_transport_config("grpc", None, env=env)
    assert (config.endpoint, config.insecure) == (target, insecure)


def test_headers_are_url_decoded_baggage_style_and_the_signal_specific_variable_wins():
    raw = " a = 1 ,Authorization=Bearer%20x%3Dy, bad, =novalue,k%2Eey=v%2C1"
    config = otlp_transport_config("grpc", None, env={"OTEL_EXPORTER_OTLP_HEADERS": raw})
    assert config.headers == (("a", "1"), ("authorization", "Bearer x=y"), ("k.ey", "v,1"))
    both = {"OTEL_EXPORTER_OTLP_HEADERS": "a=1,b=2", "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "c=3"}
    assert otlp_transport_config("grpc", None, env=both).headers == (("c", "3"),)


@pytest.mark.parametrize(
    ("proto", "raw", "says"),
    [
        ("grpc", "my%20key=v", "not a valid gRPC metadata key"),
        ("http/protobuf", "my%20key=v", "not a valid HTTP header name"),
        ("grpc", "k%2Cey=v", "not a valid gRPC metadata key"),
        ("http/protobuf", "k%3Aey=v", "not a valid HTTP header name"),
        ("grpc", "k=v%0Ax", "printable ASCII"),
        ("http/protobuf", "k=v%0D%0AX-Injected: 1", "cannot carry"),
        ("grpc", "k=caf%C3%A9", "printable ASCII"),
        ("http/protobuf", "k=%E2%82%AC", "cannot carry"),
        ("grpc", "grpc-status=1", "reserves"),  # the sender then raised AttributeError
    ],
)
def test_headers_no_request_could_carry_are_refused_naming_the_variable(proto: str, raw: str, says: str):
    """Once refused at profile() (OTLP off, a warning naming the variable); before, every
    request failed and its spans were dropped (gRPC: INTERNAL "Invalid metadata")."""
    env = {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": raw}
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_TRACES_HEADERS") as refused:
        otlp_transport_config(proto, None, env=env)
    assert says in str(refused.value)


@pytest.mark.parametrize("proto", ["grpc", "http/protobuf"])
def test_headers_reach_the_receiver_including_binary_metadata_and_latin_1(proto: str):
    raw = "x-tenant=acme,x-trace-bin=abc" + (",x-name=caf%C3%A9" if proto == "http/protobuf" else "")
    with (GrpcReceiver if proto == "grpc" else HttpReceiver)() as receiver:
        env = {"OTEL_EXPORTER_OTLP_HEADERS": raw}
        assert _send_one(proto, receiver.endpoint, env) is None
        (headers,) = receiver.headers
    assert (headers["x-tenant"], headers["x-trace-bin"]) == ("acme", "abc")
    if proto == "http/protobuf":
        assert headers["x-name"] == "café"


@pytest.mark.parametrize("proto", ["grpc", "http/protobuf"])
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://localhost:99999", "Port out of range"),  # gRPC sent to port 99999 % 65536
        ("http://localhost:abc", "Port could not be cast"),
        ("http://local host:4317", "host 'local host'"),
        ("http://[::1:4317", "Invalid IPv6 URL"),
        ("http://127.0.0.1:0", "port 0"),
        ("ftp://collector:4317", "http:// or https://"),
    ],
)
def test_endpoints_no_request_could_reach_are_refused_naming_the_variable(proto: str, url: str, says: str):
    """Every request to them failed: OTLP/HTTP dropped each (InvalidURL), gRPC retried each
    until the outbox was full."""
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": url}
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") as refused:
        otlp_transport_config(proto, None, env=env)
    assert says in str(refused.value)
    with pytest.raises(ValueError, match="the endpoint"):
        otlp_transport_config(proto, url, env={})


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_configured_headers_do_not_change_what_the_http_body_is(compression: str):
    """A Content-Type or Content-Encoding among the headers would have every request refused
    (415, 400) and its spans dropped: as in the OTLP exporters, the body's own headers win."""
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "content-type=text/plain,content-encoding=br,x-tenant=acme",
        "OTEL_EXPORTER_OTLP_COMPRESSION": compression,
    }
    with HttpReceiver() as receiver:
        assert _send_one("http/protobuf", receiver.endpoint, env) is None
        (headers,) = receiver.headers
    assert headers["content-type"] == "application/x-protobuf"
    assert headers.get("content-encoding") == ("gzip" if compression == "gzip" else None)
    assert headers["x-tenant"] == "acme"


@contextlib.contextmanager
def _redirecting_to(url: str, status: int) -> Iterator[str]:
    """An HTTP server on loopback answering every POST with `status` and Location: `url`."""

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(status)
            self.send_header("Location", url)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_delivers_or_keeps_the_request(status: int):
    """307/308 are followed with the body. After 301/302/303 requests would send a GET without
    the body, so nothing arrives: the request is kept for a retry (it was dropped, reported as
    the target's answer to the GET) and the error says where the endpoint should point."""
    with HttpReceiver() as receiver, _redirecting_to(receiver.traces_url, status) as url:
        error = _send_one("http/protobuf", url, {})
        if status in (307, 308):
            assert error is None and receiver.span_count() == 1
        else:
            assert isinstance(error, SendError) and error.retryable, error
            assert receiver.traces_url in error.message and receiver.span_count() == 0


def test_timeout_is_milliseconds_and_compression_gzip_or_none():
    env = {
        "OTEL_EXPORTER_OTLP_TIMEOUT": "60000",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "250",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "GZIP",
    }
    config = otlp_transport_config("grpc", None, env=env)
    assert config.timeout == 0.25 and config.compression == "gzip"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "-5"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "inf"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli"),
    ],
)
def test_an_unusable_value_is_refused_naming_the_variable(name: str, value: str):
    with pytest.raises(ValueError, match=name):
        otlp_transport_config("grpc", None, env={name: value})


def test_tls_files_signal_specific_wins():
    env = {
        "OTEL_EXPORTER_OTLP_CERTIFICATE": "/ca",
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "/ca2",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": "/k",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "/c",
    }
    config = otlp_transport_config("http/protobuf", None, env=env)
    assert (config.certificate, config.client_key, config.client_certificate) == ("/ca2", "/k", "/c")


# -- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["grpc", "http/protobuf"])
def test_the_timeout_is_milliseconds_on_the_wire(proto: str):
    receiver_type = GrpcReceiver if proto == "grpc" else HttpReceiver
    with receiver_type() as receiver:
        receiver.delay = 3.0  # slower than the timeout below
        env = {"OTEL_EXPORTER_OTLP_TIMEOUT": "60000", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "200"}
        transport = make_transport(otlp_transport_config(proto, receiver.endpoint, env=env))
        try:
            error = transport.send(one_span_request())
        finally:
            transport.shutdown()
        assert error is not None and error.retryable
        assert ("DEADLINE_EXCEEDED" if proto == "grpc" else "Timeout") in error.message
        assert receiver.span_count() == 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("tls"))


def _tls_env(pki: Pki, client: tuple[str, str] | None = None, **more: str) -> dict[str, str]:
    env = {"OTEL_EXPORTER_OTLP_CERTIFICATE": pki.ca, "OTEL_EXPORTER_OTLP_TIMEOUT": "5000", **more}
    if client is not None:
        env |= {
            "OTEL_EXPORTER_OTLP_CLIENT_KEY": client[0],
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": client[1],
        }
    return env


def _tls_env_on_copies(pki: Pki, directory: Path) -> tuple[list[Path], dict[str, str]]:
    """`_tls_env` with the CA and client files copied into `directory`, for tests that remove
    them: (the copies, the environment naming them)."""
    ca, key, cert = (Path(shutil.copy(path, directory)) for path in (pki.ca, *pki.client))
    return [ca, key, cert], _tls_env(replace(pki, ca=str(ca)), (str(key), str(cert)))


def _send_one(proto: str, endpoint: str, env: dict[str, str]) -> SendError | PartialSuccess | None:
    transport = make_transport(otlp_transport_config(proto, endpoint, env=env))
    try:
        return transport.send(one_span_request())
    finally:
        transport.shutdown()


@pytest.mark.parametrize("proto", ["grpc", "http/protobuf"])
def test_tls_with_the_certificate_variable(proto: str, pki: Pki):
    receiver_type = GrpcReceiver if proto == "grpc" else HttpReceiver
    with receiver_type(tls=pki.server) as receiver:
        assert receiver.endpoint.startswith("https://")
        assert _send_one(proto, receiver.endpoint, _tls_env(pki)) is None
        # the system CAs do not know this CA
        assert _send_one(proto, receiver.endpoint, {"OTEL_EXPORTER_OTLP_TIMEOUT": "2000"}) is not None
        assert receiver.span_count() == 1


@pytest.mark.parametrize("proto", ["grpc", "http/protobuf"])
def test_mutual_tls_with_the_client_certificate_variables(proto: str, pki: Pki, tmp_path: Path):
    """A collector that requires a client certificate takes the requests of a client that sends
    the one the variables name, and no other's."""
    stranger = make_client(tmp_path, make_ca(tmp_path, "other-ca"), "stranger")
    receiver_type = GrpcReceiver if proto == "grpc" else HttpReceiver
    with receiver_type(tls=pki.server, client_ca=pki.ca) as receiver:
        assert _send_one(proto, receiver.endpoint, _tls_env(pki, pki.client)) is None
        without = _send_one(proto, receiver.endpoint, _tls_env(pki))
        signed_elsewhere = _send_one(proto, receiver.endpoint, _tls_env(pki, stranger))
        assert receiver.span_count() == 1
    for error in (without, signed_elsewhere):  # refused at the handshake: kept and retried
        assert isinstance(error, SendError) and error.retryable, error


@pytest.mark.parametrize("proto", ["grpc", "http/protobuf"])
def test_tls_files_gone_after_the_start_lose_nothing(proto: str, pki: Pki, tmp_path: Path):
    """gRPC read them at the start; OTLP/HTTP reads them per connection, and while they are
    gone its requests wait (a retryable failure) instead of being dropped."""
    files, env = _tls_env_on_copies(pki, tmp_path)
    with (GrpcReceiver if proto == "grpc" else HttpReceiver)(tls=pki.server, client_ca=pki.ca) as receiver:
        transport = make_transport(otlp_transport_config(proto, receiver.endpoint, env=env))
        try:
            moved = [path.rename(path.with_name(path.name + ".moved")) for path in files]
            error = transport.send(one_span_request())
            assert error is None if proto == "grpc" else isinstance(error, SendError) and error.retryable
            for path, back in zip(moved, files, strict=True):
                path.rename(back)
            assert transport.send(one_span_request()) is None
        finally:
            transport.shutdown()
        assert receiver.span_count() == (2 if proto == "grpc" else 1)


def test_grpc_reopens_its_channel_after_a_fork_without_its_tls_files(pki: Pki, tmp_path: Path):
    """A fork during a call closes the channel and the parent opens a new one (GrpcTransport):
    with the TLS bytes read at the start, not from files that may be gone by then."""
    files, env = _tls_env_on_copies(pki, tmp_path)
    with GrpcReceiver(tls=pki.server, client_ca=pki.ca) as receiver:
        transport = make_transport(otlp_transport_config("grpc", receiver.endpoint, env=env))
        try:
            assert transport.send(one_span_request()) is None
            for path in files:
                path.unlink()
            receiver.delay = 2.0
            in_call = threading.Thread(target=transport.send, args=(one_span_request(),))
            in_call.start()
            receiver.wait_for_arrivals(2)
            transport.before_fork()  # a call is on the wire: the channel is closed
            transport.after_fork_in_parent()  # and opened again
            in_call.join()
            receiver.delay = 0.0
            assert transport.send(one_span_request()) is None
        finally:
            transport.shutdown()


@pytest.mark.parametrize("proto", ["grpc", "http/protobuf"])
def test_mutual_tls_end_to_end_from_the_environment(
    proto: str, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    with (GrpcReceiver if proto == "grpc" else HttpReceiver)(tls=pki.server, client_ca=pki.ca) as receiver:
        env = _tls_env(
            pki,
            pki.client,
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_EXPORTER_OTLP_PROTOCOL=proto,
        )
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        ci.profile(output_dir=str(tmp_path / "out"), install_signal_handlers=False, tracer_provider=None)
        try:
            assert "otlp" in ci.health()["sinks"]
            for step in ci.epochs(range(3)):
                with ci.scope("step"):
                    ci.mark("loss", float(step))
        finally:
            ci.shutdown()
        steps = [span for span in receiver.wait_for_spans(7) if span["name"] == "step"]  # + session, epochs
        assert len(steps) == 3
        # the marks as metrics take the same TLS settings, to the same receiver
        losses = receiver.wait_for_metric_points(1, name_prefix="cirron.mark.loss")
        assert {value for _, _, value in losses} <= {0.0, 1.0, 2.0}


def _encrypted_copy(key: str, directory: Path) -> str:
    out = directory / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", key, "-aes256", "-passout", "pass:secret", "-out", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(out)


# (variables -> (file kind or a path), the variable the error names, what it says); kinds: the
# PKI's "ca", "client_key", "client_cert", "server_key", "not_pem", "encrypted_key"
UNUSABLE_TLS_FILES = [
    ({"CERTIFICATE": "/nonexistent/ca.pem"}, "OTEL_EXPORTER_OTLP_CERTIFICATE", "cannot read"),
    ({"TRACES_CERTIFICATE": "not_pem"}, "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "holds no PEM certificate"),
    (
        {"CLIENT_KEY": "client_key"},
        "OTEL_EXPORTER_OTLP_CLIENT_KEY",
        "but neither OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE nor",
    ),
    (
        {"CLIENT_CERTIFICATE": "client_cert"},
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        "but neither OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY nor",
    ),
    (
        {"CLIENT_KEY": "/nonexistent/client.key", "CLIENT_CERTIFICATE": "client_cert"},
        "OTEL_EXPORTER_OTLP_CLIENT_KEY",
        "cannot read",
    ),
    (
        {"CLIENT_KEY": "server_key", "CLIENT_CERTIFICATE": "client_cert"},
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        "its private key",
    ),
    (
        {"CLIENT_KEY": "encrypted_key", "CLIENT_CERTIFICATE": "client_cert"},
        "OTEL_EXPORTER_OTLP_CLIENT_KEY",
        "encrypted",
    ),
]


def _tls_file_env(files: dict[str, str], pki: Pki, directory: Path) -> dict[str, str]:
    not_pem = directory / "not.pem"
    not_pem.write_text("not a certificate\n")
    kinds = {
        "ca": pki.ca,
        "client_key": pki.client[0],
        "client_cert": pki.client[1],
        "server_key": pki.server[0],
        "not_pem": str(not_pem),
        "encrypted_key": _encrypted_copy(pki.client[0], directory),
    }
    return {f"OTEL_EXPORTER_OTLP_{name}": kinds.get(value, value) for name, value in files.items()}


@pytest.mark.parametrize("proto", ["grpc", "http/protobuf"])
@pytest.mark.parametrize(("files", "named", "says"), UNUSABLE_TLS_FILES)
def test_unusable_tls_files_are_refused_naming_the_variable(
    proto: str, files: dict[str, str], named: str, says: str, pki: Pki, tmp_path: Path
):
    env = _tls_file_env(files, pki, tmp_path)
    with pytest.raises(ValueError, match=named) as refused:
        otlp_transport_config(proto, "https://127.0.0.1:4999", env=env)
    assert says in str(refused.value)
    # Over plaintext the files are not used, so not read (as the OpenTelemetry exporters do).
    assert otlp_transport_config(proto, "http://127.0.0.1:4999", env=env).insecure == (proto == "grpc")


@pytest.mark.parametrize("proto", ["grpc", "http/protobuf"])
@pytest.mark.parametrize(
    "files",
    [
        {"CLIENT_KEY": "client_key"},
        {"CLIENT_CERTIFICATE": "client_cert"},
        {"CERTIFICATE": "/nonexistent/ca.pem"},
    ],
)
def test_unusable_tls_files_turn_otlp_off_with_a_warning_not_the_program_down(
    proto: str, files: dict[str, str], pki: Pki, tmp_path: Path
):
    """grpcio aborts the process when given a client key without its certificate; an unreadable
    file made every OTLP/HTTP request fail (its spans dropped). Now profile() warns, naming the
    variable, and the program goes on with the spool."""
    env = _tls_file_env(files, pki, tmp_path) | {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://127.0.0.1:4999",
        "OTEL_EXPORTER_OTLP_PROTOCOL": proto,
    }
    run = run_script(
        f"""
        import json, warnings
        import cirron_otel as ci
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ci.profile(output_dir={str(tmp_path / "out")!r}, install_signal_handlers=False)
            with ci.scope("work"):
                ci.mark("loss", 0.5)
            ci.shutdown()
        said = [str(w.message) for w in caught]
        print(json.dumps({{"sinks": sorted(ci.health()["sinks"]), "warnings": said}}))
        """,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["sinks"] == ["spool"]
    (named,) = files
    assert any(f"OTEL_EXPORTER_OTLP_{named}" in w for w in result["warnings"]), result["warnings"]


def test_a_broken_variable_turns_otlp_off_with_a_warning_not_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "soon")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ci.profile(output_dir=str(tmp_path), install_signal_handlers=False, tracer_provider=None)
        with ci.scope("work"):
            pass
        ci.shutdown()
    assert set(ci.health()["sinks"]) == {"spool"}
    assert any("OTEL_EXPORTER_OTLP_TIMEOUT" in str(w.message) for w in caught)
