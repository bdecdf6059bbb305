"""The credentials of one ``stagemesh up`` run (services/credentials.py): the operator's
mesh key or a fresh one, in a file of the run directory (never on a command line); with
``--tls`` a development CA and a certificate per stage; and etcd's users, one per role.
The command itself is a member too: it probes the stages' health."""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path

from services import credentials
from services.config import parse_endpoints
from services.credentials import MESH_KEY_ENV, MeshCredentials
from services.operator.certs import CertFiles


@dataclasses.dataclass
class RunSecrets:
    """Where this run's key, certificates and etcd passwords are, and the flags that
    hand each stage its own."""

    mesh_key_file: Path
    #: A certificate per stage (and ``client`` for this command); none without --tls.
    certs: dict[str, CertFiles]
    #: etcd password files by role, once :meth:`enable_etcd_users` ran.
    etcd_users: dict[str, Path] = dataclasses.field(default_factory=dict)

    @classmethod
    def create(cls, run_dir: Path, tls: bool, host: str) -> RunSecrets:
        """Write the key (``STAGEMESH_MESH_KEY``, else fresh) and, with ``tls``, the
        certificates into ``run_dir`` (mode 0700), and present them from this process."""
        from services.operator.certs import make_certs

        mesh_key_file = run_dir / "mesh.key"
        mesh_key_file.touch(mode=0o600)
        mesh_key_file.write_text(os.environ.get(MESH_KEY_ENV) or secrets.token_hex(32))
        made = cls(mesh_key_file, make_certs(run_dir / "tls", hosts=[host]) if tls else {})
        own = made.own
        credentials.install(
            MeshCredentials.load(
                mesh_key_file=str(mesh_key_file),
                tls_cert=str(own.cert) if own else "",
                tls_key=str(own.key) if own else "",
                tls_ca=str(own.ca) if own else "",
            )
        )
        return made

    @property
    def own(self) -> CertFiles | None:
        """This command's certificate (``client``), with --tls."""
        return self.certs.get("client")

    def enable_etcd_users(self, endpoint: str, run_dir: Path) -> None:
        """etcd's authentication on for this run (services.operator.etcd_auth): a fresh
        password per role, each in a 0600 file of the run directory; this command then
        speaks to etcd as ``client``."""
        from services.operator import etcd_auth

        files = etcd_auth.write_passwords(run_dir)
        etcd_auth.enable(
            parse_endpoints(endpoint), {role: path.read_text() for role, path in files.items()}
        )
        self.etcd_users = files
        credentials.install(
            dataclasses.replace(
                credentials.current(),
                etcd_user="client",
                etcd_password=files["client"].read_text(),
            )
        )

    def stage_flags(self, stage: str) -> list[str]:
        """A stage's key, certificate and etcd user flags (``prefill-1`` is ``prefill``)."""
        role = stage.split("-")[0]
        files = self.certs.get(role)
        return [
            "--mesh-key-file",
            str(self.mesh_key_file),
            *(files.flags() if files else []),
            "--etcd-user",
            role,
            "--etcd-password-file",
            str(self.etcd_users[role]),
        ]
