"""Printing and saving benchmark results: a table on stdout, optional JSON and PNG."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def add_output_arguments(parser: argparse.ArgumentParser, home: str) -> None:
    """The flags every benchmark shares: the stagemesh home and where results go."""
    parser.add_argument("--home", default=home)
    parser.add_argument("--json", default="", help="write results as JSON here")
    parser.add_argument("--png", default="", help="write a plot here (needs matplotlib)")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """Print rows as an aligned table; columns are (key, header, format spec)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append(
            [
                format(row[key], spec) if row.get(key) is not None else "-"
                for key, _, spec in columns
            ]
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write a benchmark's results where ``--json`` asked, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def write_png(
    path: Path,
    title: str,
    x_label: str,
    series: dict[str, tuple[list[float], list[float]]],
    y_label: str,
) -> None:
    """One line per series; needs matplotlib (pip install -e '.[bench]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; skipping {path} (pip install -e '.[bench]')")
        return
    figure, axes = plt.subplots(figsize=(8, 5))
    for name, (xs, ys) in series.items():
        axes.plot(xs, ys, marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")
