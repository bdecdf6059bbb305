"""What several ``stagemesh`` subcommands share: the state directory, the credentials a
tool presents to the stages, the layout flags, and waiting for a signal."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from services import credentials
from services.config import ENV_PREFIX, StageConfig, build_config
from services.placement import LAYOUTS

if TYPE_CHECKING:
    from services.operator.mesh_start import StopRequest
    from services.placement import Layout

#: The stage settings a tool presents to the stages with (services/credentials.py).
CREDENTIAL_SETTINGS = (
    "mesh_key_file",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "etcd_user",
    "etcd_password_file",
)


def home_of(args: argparse.Namespace) -> Path:
    """The state directory: ``--home``, else ``STAGEMESH_HOME``, else the stages' default."""
    return Path(build_config(StageConfig, {"home": args.home}).home)


def add_credential_arguments(parser: argparse.ArgumentParser) -> None:
    """The mesh credentials a tool presents to the stages, as each stage takes them."""
    for name in CREDENTIAL_SETTINGS:
        parser.add_argument(
            f"--{name.replace('_', '-')}", default=None, help=f"[env {ENV_PREFIX}{name.upper()}]"
        )


def install_credentials(args: argparse.Namespace) -> None:
    """Flags, else ``STAGEMESH_*`` (the mesh key too), resolved as a stage resolves them."""
    given = {name: getattr(args, name) for name in CREDENTIAL_SETTINGS}
    credentials.install(build_config(StageConfig, given).credentials())


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """``--layout``, ``--prefill``, ``--decode``: what ``up`` runs and ``layout`` prints."""
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="auto",
        help="auto: engines and roles from this host's cores and GPUs (printed at start); "
        "aggregated: engines that prefill and decode; pd: separate prefill engines",
    )
    parser.add_argument(
        "--prefill", type=int, default=None, help="prefill engines to run (overrides the layout's)"
    )
    parser.add_argument(
        "--decode", type=int, default=None, help="decode engines to run (overrides the layout's)"
    )


def layout_of(args: argparse.Namespace, cores: list[int], gpus: int) -> Layout:
    """The layout ``--layout`` / ``--prefill`` / ``--decode`` ask for on this host shape;
    one the host cannot hold ends the command with the reason."""
    from services.placement import PlacementError, choose_layout

    try:
        return choose_layout(cores, gpus, args.layout, args.prefill, args.decode)
    except PlacementError as exc:
        raise SystemExit(f"stagemesh {args.command}: {exc}") from None


def wait_for_signal(
    every: Callable[[], None] | None = None, stop: StopRequest | None = None
) -> None:
    """Block until SIGINT/SIGTERM/SIGHUP, calling ``every`` twice a second meanwhile."""
    from services.operator.mesh_start import StopRequest

    if stop is None:  # (a StopRequest no signal has reached is falsy)
        stop = StopRequest()
    while not stop:
        if every is not None:
            every()
        time.sleep(0.5)
