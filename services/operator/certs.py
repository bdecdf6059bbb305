"""Development certificates for a mesh: one CA and a certificate per stage (``stagemesh certs``).

What :mod:`services.credentials` expects: every certificate is signed by the mesh CA,
serves as both TLS server and client (a stage is both), and carries its role twice:
the URI SAN ``spiffe://stagemesh/role/<role>`` (what a stage checks of its callers)
and the DNS name ``<role>.stagemesh`` (what a caller checks of a stage it dials as that
role). A stage's certificate also names the mesh's server name (``stagemesh``), for
callers that do not know the role, beside ``localhost``, ``127.0.0.1``, the stage's own
name (compose dials etcd as ``etcd``) and the hosts given. The ``client`` certificate
(tools, tests) names neither ``stagemesh`` nor any stage role: it cannot serve as a
stage. Keys are ECDSA P-256, which gRPC and etcd
both take. Built with ``cryptography`` (pyca), the maintained library for X.509 in
Python, rather than by driving ``openssl`` (docs/deploy.md lists those steps too).

A development CA is a convenience: production meshes use the operator's own PKI
(cert-manager, Vault, a corporate CA), with the same three files per stage.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.credentials import DEFAULT_SERVER_NAME, ROLE_URI_PREFIX


class CertError(Exception):
    """A CA found in ``--out`` that cannot be trusted or used; the message names the file."""


#: The certificates ``stagemesh certs`` makes unless told otherwise: every stage, etcd,
#: and ``client`` for tools (``stagemesh status``, the tests).
STAGES = ("etcd", "tokenizer", "router", "prefill", "decode", "kvstore", "client")


@dataclasses.dataclass(frozen=True)
class CertFiles:
    """One member's certificate, key and the mesh CA, as files."""

    cert: Path
    key: Path
    ca: Path

    def flags(self) -> list[str]:
        """The stage flags that use these files."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stagemesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(b"")
    path.chmod(0o600)  # before the key is in it
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _alt_names(role: str, hosts: Iterable[str]) -> list[x509.GeneralName]:
    """The role's URI and names (see the module docstring), then ``hosts``."""
    mesh = [] if role == "client" else [DEFAULT_SERVER_NAME]
    found: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role)]
    for name in dict.fromkeys([f"{role}.{DEFAULT_SERVER_NAME}", *mesh, role, *hosts]):
        try:
            found.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            found.append(x509.DNSName(name))
    return found


def _check_owned(path: Path, closed: int, fix: str) -> None:
    """Refuse a CA file another user could have planted, read or changed: it must be a
    regular file owned by the current user, with none of the ``closed`` mode bits set."""
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise CertError(f"{path}: not a regular file; refusing to use it as the mesh CA")
    if info.st_uid != os.geteuid():
        raise CertError(
            f"{path}: owned by uid {info.st_uid}, not by the current user ({os.geteuid()}); "
            "refusing to use a CA someone else made (remove it, or chown it if it is yours)"
        )
    if info.st_mode & closed:
        raise CertError(
            f"{path}: mode {stat.S_IMODE(info.st_mode):04o} opens it to other users; "
            f"refusing to use it as the mesh CA ({fix})"
        )


def _ca(out: Path, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in ``out`` (ca.pem, ca-key.pem), made when absent. One found there is used
    only when the current user owns both files, the key is private (0600 or tighter) and
    the certificate writable by its owner alone: else :class:`CertError`."""
    cert_path, key_path = out / "ca.pem", out / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        _check_owned(key_path, 0o077, "if no one else has read it: chmod 600, else remove it")
        _check_owned(cert_path, 0o022, "chmod go-w")
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(
                f"{key_path}: not an ECDSA key (stagemesh certs makes its own CA; or use openssl)"
            )
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("stagemesh development CA"))
        .issuer_name(_name("stagemesh development CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def make_certs(
    out: Path,
    hosts: Sequence[str] = (),
    stages: Sequence[str] = STAGES,
    days: int = 365,
) -> dict[str, CertFiles]:
    """A CA (kept when ``out`` has one) and a certificate per stage in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca(out, days)
    now = datetime.datetime.now(datetime.UTC)
    made: dict[str, CertFiles] = {}
    for stage in stages:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(stage))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(
                x509.SubjectAlternativeName(_alt_names(stage, ["localhost", "127.0.0.1", *hosts])),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        files = CertFiles(out / f"{stage}.pem", out / f"{stage}-key.pem", out / "ca.pem")
        _write_key(files.key, key)
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        made[stage] = files
    return made
