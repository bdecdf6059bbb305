"""``stagemesh certs``: a development CA and a TLS certificate per stage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.operator.certs import STAGES


def cmd_certs(args: argparse.Namespace) -> int:
    """Make (or extend, with a CA already in ``--out`` that only this user controls) the
    certificates, and print each stage's flags."""
    from services.operator.certs import CertError, make_certs

    try:
        made = make_certs(
            Path(args.out), hosts=args.host, stages=args.stage or STAGES, days=args.days
        )
    except CertError as exc:
        print(f"stagemesh certs: {exc}", file=sys.stderr)
        return 1
    for stage, files in made.items():
        print(f"{stage:<10} {' '.join(files.flags())}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``certs`` and its flags."""
    certs = sub.add_parser("certs", help="make a development CA and a TLS certificate per stage")
    certs.add_argument(
        "--out",
        required=True,
        help="directory for ca.pem and <stage>.pem / <stage>-key.pem; a CA already there is "
        "reused only when this user owns it and its key is private (mode 0600)",
    )
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        help="a host name or address the stages are dialled at (repeat; localhost and "
        "127.0.0.1 are always in)",
    )
    certs.add_argument(
        "--stage",
        action="append",
        default=[],
        help=f"only these certificates (default: {', '.join(STAGES)})",
    )
    certs.add_argument("--days", type=int, default=365, help="validity of the certificates")
    certs.set_defaults(func=cmd_certs)
