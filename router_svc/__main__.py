"""``python -m router_svc``: run the router stage."""

import sys

from router_svc import fleet
from router_svc.config import RouterConfig
from router_svc.service import RouterStage
from services.config import parse_config
from services.exits import run_main
from services.server import run_stage

#: The name the stage goes by in its messages.
PROG = "stagemesh router"


def main(argv: list[str] | None = None) -> None:
    """Run one router process, or with ``--workers N`` the parent of N (:mod:`fleet`)."""
    argv = sys.argv[1:] if argv is None else argv
    config = parse_config(RouterConfig, argv, prog=PROG)
    fleet.check(config)
    if config.workers > 1:
        fleet.run_fleet(config, argv)
    run_stage(config, RouterStage(config))


if __name__ == "__main__":
    run_main(main, PROG)
