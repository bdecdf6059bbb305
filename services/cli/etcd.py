"""``stagemesh etcd``: the embedded etcd server alone, in the foreground."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.cli.common import wait_for_signal


def cmd_etcd(args: argparse.Namespace) -> int:
    """Run etcd until a signal; a taken port is one line, not a server's log."""
    from services.exits import StartFailed
    from services.operator.etcd_server import EmbeddedEtcd
    from services.ports import PortClaim, taken

    etcd = EmbeddedEtcd(
        client_port=args.port,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        host=args.host,
    )
    try:
        for port in taken([PortClaim(etcd.client_port, "--port", "etcd", etcd.host)]):
            raise StartFailed(f"{port.reason()}; stop it, or choose another port with --port")
        etcd.start()
    except StartFailed as exc:
        print(f"stagemesh etcd: {exc}", file=sys.stderr)
        etcd.stop()
        return 1
    print(f"etcd on {etcd.endpoint} (data in {etcd.data_dir}); Ctrl-C stops it", flush=True)
    try:
        wait_for_signal()
    finally:
        etcd.stop()
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``etcd`` and its flags."""
    etcd = sub.add_parser("etcd", help="run the embedded etcd server in the foreground")
    etcd.add_argument("--port", type=int, default=2379)
    etcd.add_argument("--host", default="127.0.0.1")
    etcd.add_argument("--data-dir", default="", help="keep data here (default: a temporary dir)")
    etcd.set_defaults(func=cmd_etcd)
