"""TLS to the hub, end to end: the real CLI against a loopback HTTPS hub with a throwaway CA.

Precedence: HUB_CA_BUNDLE (kit) when set, else the operating system's trust store as OpenSSL
finds it. REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE never take part, and nothing turns verification off.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trust_poller.playground.harness import cli_env
from trust_poller.playground.loopback_hub import LoopbackHub

KitWriter = Callable[..., Path]
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "trust_poller"


@dataclass(frozen=True)
class Authority:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    pem_path: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def make_authority(directory: Path, common_name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject_key = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(subject_key, critical=False)
    )
    certificate = builder.sign(key, hashes.SHA256())
    pem_path = directory / f"{common_name.replace(' ', '-')}.pem"
    pem_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return Authority(certificate, key, pem_path)


def server_context(authority: Authority, directory: Path) -> ssl.SSLContext:
    """A server certificate for 127.0.0.1 only (not "localhost"), signed by `authority`."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key())
    certificate = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name("loopback hub"))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(issuer_key_id, critical=False)
        .sign(authority.key, hashes.SHA256())
    )
    chain = directory / "server.pem"
    chain.write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    return context


@pytest.fixture
def hub_ca(tmp_path: Path) -> Authority:
    return make_authority(tmp_path, "throwaway hub CA")


@pytest.fixture
def other_ca(tmp_path: Path) -> Authority:
    """A CA that did not sign the hub's certificate."""
    return make_authority(tmp_path, "unrelated CA")


@pytest.fixture
def hub(hub_ca: Authority, tmp_path: Path) -> Iterator[LoopbackHub]:
    """Overrides conftest's hub: the same loopback hub, over HTTPS."""
    with LoopbackHub(trust_name="TLS Trust", tls=server_context(hub_ca, tmp_path)) as server:
        yield server


def whoami(kit: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`whoami --json` in a child whose only CA settings are the ones given here."""
    child_env = cli_env(**env)
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        if name not in env:
            child_env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "trust_poller", "whoami", "--json", "--kit", str(kit)],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env,
        check=False,
    )


def assert_refused_for_tls(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 69, done.stderr
    assert "TLS verification of the hub failed" in done.stderr
    assert done.stdout == ""


def test_loopback_hub_serves_https(hub: LoopbackHub) -> None:
    assert hub.url.startswith("https://127.0.0.1:")


def test_hub_signed_by_private_ca_is_trusted_through_hub_ca_bundle(
    hub: LoopbackHub, hub_ca: Authority, write_kit: KitWriter
) -> None:
    done = whoami(write_kit(HUB_CA_BUNDLE=str(hub_ca.pem_path)))

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["trust_id"] == hub.trust_id
    assert hub.heartbeats


def test_hub_signed_by_private_ca_is_refused_without_hub_ca_bundle(
    hub: LoopbackHub, write_kit: KitWriter
) -> None:
    done = whoami(write_kit())

    assert_refused_for_tls(done)
    assert "certificate verify failed" in done.stderr
    assert "system trust store" in done.stderr
    assert "HUB_CA_BUNDLE" in done.stderr  # the fix is named
    assert hub.heartbeats == []


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_requests_ca_variables_do_not_rescue_an_unset_hub_ca_bundle(
    hub: LoopbackHub, hub_ca: Authority, write_kit: KitWriter, variable: str
) -> None:
    done = whoami(write_kit(), **{variable: str(hub_ca.pem_path)})

    assert_refused_for_tls(done)
    assert "REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE are never used" in done.stderr


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"])
def test_environment_cannot_override_a_set_hub_ca_bundle(
    hub: LoopbackHub,
    hub_ca: Authority,
    other_ca: Authority,
    write_kit: KitWriter,
    variable: str,
) -> None:
    pointing_elsewhere = whoami(
        write_kit(HUB_CA_BUNDLE=str(hub_ca.pem_path)), **{variable: str(other_ca.pem_path)}
    )
    assert pointing_elsewhere.returncode == 0, pointing_elsewhere.stderr

    wrong_bundle_with_right_env = whoami(
        write_kit(HUB_CA_BUNDLE=str(other_ca.pem_path)), **{variable: str(hub_ca.pem_path)}
    )
    assert_refused_for_tls(wrong_bundle_with_right_env)
    assert f"against HUB_CA_BUNDLE {other_ca.pem_path}" in wrong_bundle_with_right_env.stderr


def test_without_hub_ca_bundle_the_system_trust_store_is_used(
    hub: LoopbackHub, hub_ca: Authority, write_kit: KitWriter
) -> None:
    """SSL_CERT_FILE is how OpenSSL itself relocates the system store: honoured, unlike
    REQUESTS_CA_BUNDLE, which would prove the requests/certifi store was used instead."""
    done = whoami(write_kit(), SSL_CERT_FILE=str(hub_ca.pem_path))

    assert done.returncode == 0, done.stderr


def test_host_name_is_verified_as_well_as_the_chain(
    hub: LoopbackHub, hub_ca: Authority, write_kit: KitWriter
) -> None:
    kit = write_kit(
        CENTRAL_HUB_API_URL=f"https://localhost:{hub.port}/api",
        HUB_CA_BUNDLE=str(hub_ca.pem_path),
    )

    done = whoami(kit)

    assert_refused_for_tls(done)
    assert re.search(r"(?i)hostname mismatch|not valid for 'localhost'", done.stderr), done.stderr


def test_no_kit_key_or_environment_variable_switches_verification_off(
    hub: LoopbackHub, write_kit: KitWriter
) -> None:
    kit = write_kit(
        HUB_TLS_VERIFY="false",
        HUB_VERIFY_TLS="0",
        VERIFY_SSL="false",
        SSL_VERIFY="false",
        INSECURE="1",
        HUB_INSECURE="true",
        TLS_VERIFY="no",
        HUB_CA_BUNDLE="",
    )

    done = whoami(
        kit,
        PYTHONHTTPSVERIFY="0",
        REQUESTS_CA_BUNDLE="",
        CURL_CA_BUNDLE="",
        SSL_CERT_FILE="/dev/null",
    )

    assert_refused_for_tls(done)
    assert hub.heartbeats == []


def test_package_code_has_no_way_to_disable_verification() -> None:
    """ruff's S501 misses `session.request(..., verify=False)`; this guard does not."""
    bypasses = re.compile(
        r"verify\s*=\s*(False|0|None)\b|CERT_NONE|check_hostname\s*=\s*False|"
        r"_create_unverified_context|disable_warnings"
    )
    offenders = [
        f"{path.relative_to(PACKAGE_DIR)}:{number}: {line.strip()}"
        for path in PACKAGE_DIR.rglob("*.py")
        if "playground" not in path.parts
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if bypasses.search(line)
    ]
    assert offenders == []
