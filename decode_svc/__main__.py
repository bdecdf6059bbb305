"""``python -m decode_svc``: run the decode stage."""

from decode_svc.config import DecodeConfig
from services.config import parse_config
from services.engine.launch import run_engines


def main(argv: list[str] | None = None) -> None:
    config = parse_config(DecodeConfig, argv, prog="stagemesh decode")
    config.claim_cores()  # before the engine stack loads: all it starts inherits the cores
    from decode_svc.stage import (
        DecodeStage,  # with --engine vllm, vLLM and torch load later: seconds
    )

    run_engines(config, DecodeStage)


if __name__ == "__main__":
    main()
