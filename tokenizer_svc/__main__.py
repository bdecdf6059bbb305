"""``python -m tokenizer_svc``: run the tokenizer stage."""

from services.config import parse_config
from services.exits import run_main
from services.server import run_stage
from tokenizer_svc.config import TokenizerConfig
from tokenizer_svc.service import TokenizerStage

#: The name the stage goes by in its messages.
PROG = "stagemesh tokenizer"


def main(argv: list[str] | None = None) -> None:
    """Run the tokenizer stage."""
    config = parse_config(TokenizerConfig, argv, prog=PROG)
    run_stage(config, TokenizerStage(config))


if __name__ == "__main__":
    run_main(main, PROG)
