"""The OTLP transports honour OTEL_EXPORTER_OTLP_[TRACES_]* exactly as the specification says.

Resolution (`_config.otlp_transport_config`) is checked on its own, then end to end against real
receivers: a timeout in milliseconds, TLS with a CA file, and a broken value that turns OTLP
off with a warning instead of raising into the program.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import pytest
from cirron_otel.exporters.otlp import make_transport

import cirron_otel as ci
from cirron_otel._config import otlp_transport_config, resolve
from tests.support.otlp_receivers import GrpcReceiver, HttpReceiver

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
    raw = " a = 1 ,Authorization=Bearer%20x%3Dy, bad, =novalue,k%2Cey=v%2C1"
    config = otlp_transport_config("grpc", None, env={"OTEL_EXPORTER_OTLP_HEADERS": raw})
    assert config.headers == (("a", "1"), ("authorization", "Bearer x=y"), ("k,ey", "v,1"))
    both = {"OTEL_EXPORTER_OTLP_HEADERS": "a=1,b=2", "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "c=3"}
    assert otlp_transport_config("grpc", None, env=both).headers == (("c", "3"),)


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
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1: (key file, certificate file)."""
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(key), str(cert)


@pytest.mark.parametrize("proto", ["grpc", "http/protobuf"])
def test_tls_with_the_certificate_variable(proto: str, certificate: tuple[str, str]):
    receiver_type = GrpcReceiver if proto == "grpc" else HttpReceiver
    with receiver_type(tls=certificate) as receiver:
        assert receiver.endpoint.startswith("https://")
        env = {"OTEL_EXPORTER_OTLP_CERTIFICATE": certificate[1], "OTEL_EXPORTER_OTLP_TIMEOUT": "5000"}
        trusted = make_transport(otlp_transport_config(proto, receiver.endpoint, env=env))
        untrusted = make_transport(
            otlp_transport_config(proto, receiver.endpoint, env={"OTEL_EXPORTER_OTLP_TIMEOUT": "2000"})
        )
        try:
            assert trusted.send(one_span_request()) is None
            error = untrusted.send(one_span_request())  # the system CAs do not know this certificate
            assert error is not None
        finally:
            trusted.shutdown()
            untrusted.shutdown()
        assert receiver.span_count() == 1


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
