"""``python -m router_svc``: run the router stage."""

from router_svc.config import RouterConfig
from router_svc.service import RouterStage
from services.config import parse_config
from services.server import run_stage


def main(argv: list[str] | None = None) -> None:
    config = parse_config(RouterConfig, argv, prog="stagemesh router")
    run_stage(config, RouterStage(config))


if __name__ == "__main__":
    main()
