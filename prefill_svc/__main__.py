"""``python -m prefill_svc``: run the prefill stage."""

from prefill_svc.config import PrefillConfig
from services.config import parse_config
from services.engine.launch import run_engines


def main(argv: list[str] | None = None) -> None:
    config = parse_config(PrefillConfig, argv, prog="stagemesh prefill")
    config.claim_cores()  # before the engine stack loads: all it starts inherits the cores
    from prefill_svc.stage import (
        PrefillStage,  # with --engine vllm, vLLM and torch load later: seconds
    )

    run_engines(config, PrefillStage)


if __name__ == "__main__":
    main()
