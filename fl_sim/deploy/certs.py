"""Development certificates and SuperNode keys, made with `cryptography` (a Flower dependency).

`make_dev_certs` writes a throw-away CA and a SuperLink certificate signed by it, with the
subject alternative names (SANs) that SuperNodes dial: TLS checks the address a node uses
against these names, so a certificate for `localhost` refuses a node dialling 10.0.0.5.
For production, use certificates from your organisation's CA (docs/deployment.md).

`make_node_key` writes a SuperNode's authentication key pair in OpenSSH format on a NIST
curve (ECDSA P-384), the only kind Flower 1.39 accepts (ed25519 is refused).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fl_sim.errors import FlSimError

DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertFiles:
    """The files a TLS SuperLink needs (`ca_cert` also goes to every SuperNode)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> CertFiles:
        d = Path(directory)
        return cls(d / "ca.crt", d / "ca.key", d / "server.pem", d / "server.key")

    def check_server_side(self) -> None:
        missing = [p for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]
        if missing:
            raise FlSimError(
                f"certificate files missing: {', '.join(map(str, missing))}. Make development "
                "ones with `fl-sim deploy certs DIR --san HOST`, or put your own ca.crt, "
                "server.pem and server.key there (docs/deployment.md).")


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey,
               fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)  # private keys readable by their owner only


def make_dev_certs(directory: Path, sans: list[str] | tuple[str, ...] = DEFAULT_SANS,
                   days: int = 365) -> CertFiles:
    """A development CA and a SuperLink certificate for `sans` (DNS names or IP addresses)."""
    if not sans:
        raise FlSimError("a server certificate needs at least one --san (a host name or IP).")
    files = CertFiles.in_dir(directory)
    files.ca_cert.parent.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)  # 5 min: clock skew

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl-sim development CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write_key(files.ca_key, ca_key)
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(files.server_key, server_key)
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return files


def make_node_key(private_path: Path) -> tuple[Path, Path]:
    """A SuperNode key pair: `private_path` (stays on the node) and `<private_path>.pub`
    (registered on the SuperLink with `fl-sim deploy register`)."""
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    if private_path.exists():
        raise FlSimError(f"{private_path} exists: a node key is never overwritten (its public "
                         "half may be registered). Choose another name or delete it first.")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_key(private_path, key, serialization.PrivateFormat.OpenSSH)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    public_path.write_bytes(public + f" fl-sim-{private_path.stem}\n".encode())
    return private_path, public_path
