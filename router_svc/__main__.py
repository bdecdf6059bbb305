"""``python -m router_svc``: run the router stage."""

from router_svc.config import RouterConfig
from router_svc.service import RouterStage
from services.config import parse_config
from services.exits import run_main
from services.server import run_stage

#: The name the stage goes by in its messages.
PROG = "stagemesh router"


def main(argv: list[str] | None = None) -> None:
    config = parse_config(RouterConfig, argv, prog=PROG)
    run_stage(config, RouterStage(config))


if __name__ == "__main__":
    run_main(main, PROG)
