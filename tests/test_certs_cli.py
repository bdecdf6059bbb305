"""`stagemesh certs` run as an operator runs it: it makes a CA once and reuses it, but
never one another user could have planted or read (issue #30)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.stages import skip_unless_required


def certs(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``stagemesh certs --out OUT`` as a process: exit code, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "certs", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_certs_reuses_its_own_ca(tmp_path: Path) -> None:
    """A second run signs new certificates with the CA the first one made."""
    first = certs(tmp_path, "--stage", "router")
    assert first.returncode == 0, first.stderr
    ca = (tmp_path / "ca.pem").read_bytes()
    assert (tmp_path / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    again = certs(tmp_path, "--stage", "decode")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "ca.pem").read_bytes() == ca  # the same CA signed both
    assert "--tls-cert" in again.stdout and (tmp_path / "decode.pem").exists()


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_certs_refuses_a_ca_key_others_can_read(tmp_path: Path, mode: int) -> None:
    """A CA key the group or others may read may be known to them: nothing is signed."""
    assert certs(tmp_path, "--stage", "router").returncode == 0
    key = tmp_path / "ca-key.pem"
    key.chmod(mode)
    refused = certs(tmp_path, "--stage", "decode")
    assert refused.returncode == 1
    assert str(key) in refused.stderr and f"{mode:04o}" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "decode.pem").exists()  # nothing signed with it


def test_certs_refuses_a_ca_another_user_owns(tmp_path: Path) -> None:
    """A CA another user put in --out is theirs to mint stage certificates with."""
    assert certs(tmp_path, "--stage", "router").returncode == 0
    if os.geteuid() != 0:
        skip_unless_required("only root can give a file to another user")
    key = tmp_path / "ca-key.pem"
    os.chown(key, 65534, 65534)  # nobody
    refused = certs(tmp_path, "--stage", "decode")
    assert refused.returncode == 1
    assert str(key) in refused.stderr and "uid 65534" in refused.stderr
    assert not (tmp_path / "decode.pem").exists()


def test_certs_refuses_a_ca_certificate_others_can_change(tmp_path: Path) -> None:
    """A CA certificate others may rewrite would let them swap in their own CA."""
    assert certs(tmp_path, "--stage", "router").returncode == 0
    (tmp_path / "ca.pem").chmod(0o666)
    refused = certs(tmp_path, "--stage", "decode")
    assert refused.returncode == 1 and str(tmp_path / "ca.pem") in refused.stderr
