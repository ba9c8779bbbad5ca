"""Certificates, API keys and gRPC call helpers for the security tests.

Certificates are made with ``cryptography``: a CA, a server certificate for
127.0.0.1/localhost, a client certificate, and a second CA (with a client)
that nothing trusts.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from router import security

KEYS = {"alpha": security.new_key(), "alpha-2": security.new_key(), "beta": security.new_key()}
Metadata = tuple[tuple[str, str], ...]


@dataclass
class Pki:
    """PEM files of the test's certificate authorities and certificates."""

    dir: Path

    def path(self, name: str) -> str:
        """File of ``name`` (ca, server, client, rogue-ca, rogue; .crt or .key)."""
        return str(self.dir / name)

    def pem(self, name: str) -> bytes:
        """Contents of ``name``."""
        return (self.dir / name).read_bytes()


def issue(
    pki: Pki,
    name: str,
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None,
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A key and certificate; a CA when ``issuer`` is None, else a leaf for ``usage``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"qwen-serve test {name}")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[1].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is None:
        usage_ext = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        builder = builder.add_extension(usage_ext, critical=True)
    else:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[0].public_key())
        builder = builder.add_extension(aki, critical=False)
        assert usage is not None, "a leaf certificate needs an extended key usage"
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(issuer[0] if issuer else key, hashes.SHA256())
    (pki.dir / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (pki.dir / f"{name}.key").write_bytes(key_pem)
    return key, cert


def make_pki(directory: Path) -> Pki:
    """A CA with server and client certificates, plus an untrusted CA with a client."""
    out = Pki(directory)
    ca = issue(out, "ca", None)
    issue(out, "server", ca, ExtendedKeyUsageOID.SERVER_AUTH)
    issue(out, "client", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = issue(out, "rogue-ca", None)
    issue(out, "rogue", rogue, ExtendedKeyUsageOID.CLIENT_AUTH)
    return out


def write_keys_file(path: Path) -> str:
    """Key file: alpha holds a plain key and a digest-only key, beta one key."""
    digest = security.digest(KEYS["alpha-2"]).hex()
    path.write_text(
        f"# test keys\nalpha:{KEYS['alpha']}\n\nalpha:sha256:{digest}\nbeta:{KEYS['beta']}\n"
    )
    path.chmod(0o600)
    return str(path)


def tls(pki: Pki, client: str | None = None, ca: str = "ca") -> grpc.ChannelCredentials:
    """Channel credentials trusting ``ca``, presenting ``client``'s certificate if given."""
    if client is None:
        return grpc.ssl_channel_credentials(pki.pem(f"{ca}.crt"))
    return grpc.ssl_channel_credentials(
        pki.pem(f"{ca}.crt"), pki.pem(f"{client}.key"), pki.pem(f"{client}.crt")
    )


def bearer(tenant: str) -> Metadata:
    """Metadata carrying ``tenant``'s key."""
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


async def code(call: object) -> grpc.StatusCode:
    """The status a unary call (an awaitable) ends with; OK when it succeeds."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
