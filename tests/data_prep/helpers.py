"""Shared paths and small independent references for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
REPO = Path(__file__).resolve().parents[2]


def nonblank_lines(path: Path, count: int | None = None, encoding: str = "utf-8") -> list[str]:
    """The first ``count`` lines of a file, line ends removed, blank lines dropped."""
    text = path.read_bytes().decode(encoding)
    lines = text.split("\n")[:count] if count else text.split("\n")
    return [line.rstrip("\r") for line in lines if line.strip()]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())
