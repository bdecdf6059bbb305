"""``python -m tokenizer_svc``: run the tokenizer stage."""

from services.config import parse_config
from services.server import run_stage
from tokenizer_svc.config import TokenizerConfig
from tokenizer_svc.service import TokenizerStage


def main(argv: list[str] | None = None) -> None:
    config = parse_config(TokenizerConfig, argv, prog="stagemesh tokenizer")
    run_stage(config, TokenizerStage(config))


if __name__ == "__main__":
    main()
