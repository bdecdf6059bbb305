"""``python -m decode_svc``: run the decode stage."""

from decode_svc.config import DecodeConfig
from services.config import parse_config
from services.engine.launch import run_engines
from services.exits import run_main

#: The name the stage goes by in its messages.
PROG = "stagemesh decode"


def main(argv: list[str] | None = None) -> None:
    """Parse the decode stage's settings, then serve its engines until told to stop."""
    config = parse_config(DecodeConfig, argv, prog=PROG)
    config.claim_cores()  # before the engine stack loads: all it starts inherits the cores
    config.check_ports()  # and before its import's seconds, a taken port is one line
    from decode_svc.stage import (
        DecodeStage,  # with --engine vllm, vLLM and torch load later: seconds
    )

    run_engines(config, DecodeStage)


if __name__ == "__main__":
    run_main(main, PROG)
