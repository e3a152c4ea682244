"""TLS contexts that load their authorities on first use verify exactly as strictly."""

from __future__ import annotations

import datetime as dt
import http.server
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import certifi
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pagesync.cli import tls


@pytest.fixture
def lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssl, "create_default_context", ssl.create_default_context)
    tls.install()


def _self_signed(tmp: Path, host: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )  # fmt: skip
    return cert_file, key_file


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A real HTTPS server on loopback whose certificate names `localhost`, signed by
    itself: trusted only by a client given its certificate."""
    cert, key = _self_signed(tmp_path, "localhost")

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], cert
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.usefixtures("lazy")
def test_authorities_are_loaded_at_first_use_only() -> None:
    ctx = ssl.create_default_context(cafile=certifi.where())
    assert isinstance(ctx, tls.LazyCAContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ssl.SSLContext.cert_store_stats(ctx)["x509_ca"] == 0  # nothing loaded yet
    assert ctx.cert_store_stats()["x509_ca"] > 100  # certifi's, once asked for


@pytest.mark.usefixtures("lazy")
def test_lazy_contexts_verify_as_strictly(https_server: tuple[int, Path]) -> None:
    port, cert = https_server
    trusting = ssl.create_default_context(cafile=str(cert))
    assert isinstance(trusting, tls.LazyCAContext)
    with httpx.Client(verify=trusting) as client:
        assert client.get(f"https://localhost:{port}/").text == "hello"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED|IP address"):
            client.get(f"https://127.0.0.1:{port}/")  # the certificate names localhost only
    with (
        httpx.Client() as client,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.get(f"https://localhost:{port}/")  # httpx's default: certifi, lazily


@pytest.mark.usefixtures("lazy")
def test_a_missing_ca_file_fails_when_the_context_is_made(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ssl.create_default_context(cafile=str(tmp_path / "missing.pem"))
