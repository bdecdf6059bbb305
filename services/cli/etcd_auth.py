"""``stagemesh etcd-auth``: etcd's authentication on for a deployed mesh (compose's
one-shot job, systemd's ``stagemesh-etcd-auth.service``, the Helm chart's hook)."""

from __future__ import annotations

import argparse
import sys

from services import credentials
from services.cli.common import add_credential_arguments, install_credentials
from services.config import parse_endpoints


def cmd_etcd_auth(args: argparse.Namespace) -> int:
    """Turn it on (once; a second run leaves etcd as it is): stages log in with their TLS
    certificate, whose common name is their role."""
    from services.operator import etcd_auth

    install_credentials(args)
    if credentials.current().tls is None:
        print(
            "stagemesh etcd-auth: needs TLS (--tls-cert, --tls-key, --tls-ca): stages log"
            " in to etcd with their certificates",
            file=sys.stderr,
        )
        return 2
    done = etcd_auth.enable(parse_endpoints(args.etcd))
    print("etcd authentication " + ("turned on" if done else "was already on"))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``etcd-auth`` and its flags."""
    auth = sub.add_parser(
        "etcd-auth", help="turn etcd's authentication on: a user and role per stage"
    )
    auth.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoints")
    add_credential_arguments(auth)
    auth.set_defaults(func=cmd_etcd_auth)
