"""``python -m prefill_svc``: run the prefill stage."""

from prefill_svc.config import PrefillConfig
from services.config import parse_config
from services.engine.launch import run_engines
from services.exits import run_main

#: The name the stage goes by in its messages.
PROG = "stagemesh prefill"


def main(argv: list[str] | None = None) -> None:
    """Parse the prefill stage's settings, then serve its engines until told to stop."""
    config = parse_config(PrefillConfig, argv, prog=PROG)
    config.claim_cores()  # before the engine stack loads: all it starts inherits the cores
    config.check_ports()  # and before its import's seconds, a taken port is one line
    from prefill_svc.stage import (
        PrefillStage,  # with --engine vllm, vLLM and torch load later: seconds
    )

    run_engines(config, PrefillStage)


if __name__ == "__main__":
    run_main(main, PROG)
