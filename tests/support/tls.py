"""A throwaway PKI for the TLS tests, made with the `openssl` command: a CA, a server certificate
for 127.0.0.1 / localhost, and a client certificate for mutual TLS, all signed by that CA."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca: str  # the CA certificate (what OTEL_EXPORTER_OTLP_CERTIFICATE names)
    server: tuple[str, str]  # (key file, certificate file) a receiver serves
    client: tuple[str, str]  # (key file, certificate file) for OTEL_EXPORTER_OTLP_CLIENT_KEY / _CERTIFICATE


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _key_and_request(directory: Path, name: str, subject: str) -> tuple[Path, Path]:
    key, request = directory / f"{name}.key", directory / f"{name}.csr"
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(request), "-subj", subject,
    )  # fmt: skip
    return key, request


def _sign(directory: Path, name: str, request: Path, ca: tuple[Path, Path], extensions: str) -> Path:
    cert, ext = directory / f"{name}.pem", directory / f"{name}.ext"
    ext.write_text(extensions + "\n")
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
        "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    return cert


def make_ca(directory: Path, name: str = "ca") -> tuple[Path, Path]:
    """(key file, certificate file) of a new self-signed CA."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN=cirron-otel test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
    )  # fmt: skip
    return key, cert


def make_client(directory: Path, ca: tuple[Path, Path], name: str = "client") -> tuple[str, str]:
    """(key file, certificate file) of a client certificate signed by `ca`."""
    key, request = _key_and_request(directory, name, f"/CN=cirron-otel test {name}")
    cert = _sign(directory, name, request, ca, "extendedKeyUsage=clientAuth")
    return str(key), str(cert)


def make_pki(directory: Path) -> Pki:
    ca = make_ca(directory)
    server_key, request = _key_and_request(directory, "server", "/CN=localhost")
    server_cert = _sign(
        directory,
        "server",
        request,
        ca,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    )
    return Pki(ca=str(ca[1]), server=(str(server_key), str(server_cert)), client=make_client(directory, ca))
