"""The ``stagemesh`` command: run the embedded mesh, prepare models, run single stages.

stagemesh up                 etcd + every stage on this host, with the bundled model
stagemesh layout             the engines, roles and cores `up` would choose on this host
stagemesh model prepare      turn the bundled GGUF into a float32 HF model directory
stagemesh status             members registered in etcd, with their health and load
stagemesh health ADDRESS     exit 0 if the stage at ADDRESS is SERVING (container probes)
stagemesh certs --out DIR    a development CA and a TLS certificate per stage
stagemesh etcd               the embedded etcd server alone (foreground)
stagemesh etcd-auth          etcd's authentication on for a deployed mesh (certificates)
stagemesh tokenizer [...]    one tokenizer stage (flags: stagemesh tokenizer --help)
stagemesh prefill [...]      one prefill engine stage
stagemesh decode [...]       one decode engine stage
stagemesh kvstore [...]      one KV store stage
stagemesh router [...]       one router stage (gRPC API and OpenAI HTTP bridge)

One module per subcommand, each adding its own parser (``register``); the tools they
drive (launcher, embedded etcd, certificates) live in services/operator/.
"""

from __future__ import annotations

import argparse
import sys

from services.cli import certs, etcd, etcd_auth, health, layout, model, status, up
from services.config import DEFAULT_HOME, ENV_PREFIX

#: Stage subcommands and the module each runs; the stage parses its own flags.
STAGE_MODULES = {
    "tokenizer": "tokenizer_svc",
    "prefill": "prefill_svc",
    "decode": "decode_svc",
    "kvstore": "kvstore_svc",
    "router": "router_svc",
}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: global flags, then each subcommand's parser."""
    parser = argparse.ArgumentParser(prog="stagemesh", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--home",
        default=None,
        help=f"state directory [env {ENV_PREFIX}HOME; default {DEFAULT_HOME}]",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (up, layout, model, status, certs, health, etcd, etcd_auth):
        command.register(sub)
    for name in STAGE_MODULES:
        sub.add_parser(
            name, help=f"run one {name} stage (see: stagemesh {name} --help)", add_help=False
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; a stage subcommand hands its flags to the stage's own parser."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in STAGE_MODULES:
        import runpy

        sys.argv = [f"stagemesh {argv[0]}", *argv[1:]]
        runpy.run_module(STAGE_MODULES[argv[0]], run_name="__main__")
        return 0
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
