"""``python -m kvstore_svc``: run the KV store stage."""

from kvstore_svc.config import KvStoreConfig
from kvstore_svc.service import KvStoreStage
from services.config import parse_config
from services.server import run_stage


def main(argv: list[str] | None = None) -> None:
    config = parse_config(KvStoreConfig, argv, prog="stagemesh kvstore")
    run_stage(config, KvStoreStage(config))


if __name__ == "__main__":
    main()
