"""``python -m kvstore_svc``: run the KV store stage."""

from kvstore_svc.config import KvStoreConfig
from kvstore_svc.service import KvStoreStage
from services.config import parse_config
from services.exits import run_main
from services.server import run_stage

#: The name the stage goes by in its messages.
PROG = "stagemesh kvstore"


def main(argv: list[str] | None = None) -> None:
    """Parse the store's settings and run it until it is told to stop."""
    config = parse_config(KvStoreConfig, argv, prog=PROG)
    run_stage(config, KvStoreStage(config))


if __name__ == "__main__":
    run_main(main, PROG)
