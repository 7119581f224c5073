"""A throwaway certificate authority for the mutual TLS of SeaweedFS's gRPC ports.

SeaweedFS's gRPC ports (master, volume, filer, S3, admin) answer anyone unless mutual
TLS is configured; with it, a client must present a certificate signed by the stack's
CA. One CA and one certificate per stack start suffice: every component runs in one
``weed mini`` process, which reads them once. The CA's key is never written anywhere.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field

# Imported with the module, not in the function: cryptography's Rust bindings must not be imported
# twice in one process (pytester's in-process runs drop modules imported during a run).
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class MutualTLS:
    """PEM files: the CA certificate, and one certificate (server and client) with its key."""

    ca_cert: bytes
    cert: bytes
    key: bytes = field(repr=False)


def make_mutual_tls(common_name: str = "plantml-stack") -> MutualTLS:
    """A fresh CA and a certificate it signed for 127.0.0.1 and ``common_name``, valid ten years."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def builder(subject: str, issuer: str, public_key: object) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                .public_key(public_key)  # type: ignore[arg-type]
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=3650)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (builder(f"{common_name}-ca", f"{common_name}-ca", ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (builder(common_name, f"{common_name}-ca", key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name), x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return MutualTLS(
        ca_cert=ca.public_bytes(pem),
        cert=cert.public_bytes(pem),
        key=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
