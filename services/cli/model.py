"""``stagemesh model prepare``: the bundled GGUF as a float32 HF model directory."""

from __future__ import annotations

import argparse

from services.cli.common import home_of


def cmd_model_prepare(args: argparse.Namespace) -> int:
    """Prepare the bundled model once, so stages start without converting it; print its path."""
    from services.model import prepare_bundled_model

    print(prepare_bundled_model(home_of(args), force=args.force))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``model`` and its actions."""
    model = sub.add_parser("model", help="manage models").add_subparsers(
        dest="action", required=True
    )
    prepare = model.add_parser("prepare", help="prepare the bundled model (float32 HF directory)")
    prepare.add_argument("--force", action="store_true", help="prepare again even if present")
    prepare.set_defaults(func=cmd_model_prepare)
