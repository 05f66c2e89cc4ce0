"""A throwaway PKI for TLS tests: a CA, a server certificate for 127.0.0.1 (SAN IP, or the
addresses asked for) and a client certificate from a second CA, written as PEM files (with
``cryptography``)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key: Key, issuer: x509.Certificate | None, issuer_key: Key,
                 *, ca: bool, usage: x509.ObjectIdentifier | None = None,
                 server_ips: tuple[str, ...] = ("127.0.0.1",)) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]),
            critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Key, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)


@dataclass(frozen=True)
class Pki:
    """PEM files of the test PKI."""

    ca_file: Path  # the CA that signed the server certificate
    server_cert: Path  # for IP 127.0.0.1 only, unless other addresses were asked for
    server_key: Path
    client_ca_file: Path  # the CA that signed the client certificate
    client_cert: Path
    client_key: Path
    client_combined: Path  # the client certificate and its key in one file
    client_key_encrypted: Path  # the client key, encrypted with a passphrase

    def server_context(self, require_client_cert: bool = False) -> ssl.SSLContext:
        """A server-side context; with ``require_client_cert`` the server demands a client
        certificate signed by the client CA (ssl.CERT_REQUIRED)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.client_ca_file)
        return context


def make_pki(directory: Path, server_ips: tuple[str, ...] = ("127.0.0.1",)) -> Pki:
    """Generate the CAs, certificates and keys into ``directory``; the server certificate
    is for the addresses ``server_ips``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, client_ca_key, server_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    ca = _certificate("imgcache test CA", ca_key, None, ca_key, ca=True)
    client_ca = _certificate("imgcache test client CA", client_ca_key, None, client_ca_key,
                             ca=True)
    server = _certificate(server_ips[0], server_key, ca, ca_key, ca=False,
                          usage=ExtendedKeyUsageOID.SERVER_AUTH, server_ips=server_ips)
    client = _certificate("imgcache on a compute node", client_key, client_ca, client_ca_key,
                          ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {
        "ca_file": _cert_pem(ca),
        "server_cert": _cert_pem(server),
        "server_key": _key_pem(server_key),
        "client_ca_file": _cert_pem(client_ca),
        "client_cert": _cert_pem(client),
        "client_key": _key_pem(client_key),
        "client_combined": _cert_pem(client) + _key_pem(client_key),
        "client_key_encrypted": _key_pem(client_key, b"secret"),
    }
    paths = {}
    for name, pem in files.items():
        paths[name] = directory / f"{name}.pem"
        paths[name].write_bytes(pem)
    return Pki(**paths)
