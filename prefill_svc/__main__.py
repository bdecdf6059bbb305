"""``python -m prefill_svc``: run the prefill stage."""

from prefill_svc.stage import PrefillConfig, PrefillStage
from services.config import parse_config
from services.server import run_stage


def main(argv: list[str] | None = None) -> None:
    config = parse_config(PrefillConfig, argv, prog="stagemesh prefill")
    run_stage(config, PrefillStage(config))


if __name__ == "__main__":
    main()
