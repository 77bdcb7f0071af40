"""Running one catalogue case and reading back what the user saw."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .catalogue import PROGRAMS, Case
from .workspace import REPO, Workspace

DOC = REPO / "docs" / "errors.md"
# DeepSpeed's logger lines ("[2026-01-01 00:00:00,000] [WARNING] [real_accelerator.py:...]").
_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(WARNING|INFO|DEBUG)\]")
_DIGEST = re.compile(r"\b[0-9a-f]{16,64}\b")
# A list of five or more items: the fields of a config, the presets. Compared as "[…]" so that
# adding a field or a preset elsewhere does not invalidate the document.
_LONG_LIST = re.compile(r"\[(?:[^\[\],]*,){4,}[^\[\]]*\]")


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    def shown(self, stream: str) -> str:
        return self.stdout if stream == "stdout" else self.stderr


def snapshot(directory: Path) -> dict[str, str]:
    """Every file and folder under ``directory`` with a digest of its bytes."""
    state = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        state[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def run_in_process(case: Case, directory: Path) -> Outcome:
    module = importlib.import_module(PROGRAMS[case.program][0])
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = module.main(list(case.argv))
            except SystemExit as stop:  # argparse
                code = stop.code
    finally:
        os.chdir(cwd)
    return Outcome(int(code or 0), out.getvalue(), err.getvalue())


def run_subprocess(case: Case, directory: Path) -> Outcome:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-m", PROGRAMS[case.program][1], *case.argv],
                          cwd=directory, env=env, capture_output=True, text=True, timeout=120)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def message(case: Case, outcome: Outcome, directory: Path, ws: Workspace) -> str:
    """What the user reads, with the machine-specific parts made neutral for the document.

    Paths lose the case's directory (commands run there), digests become ``<sha256>``,
    DeepSpeed's start-up log lines and argparse's usage lines are dropped.
    """
    lines = [line for line in outcome.shown(case.stream).splitlines()
             if line.strip() and not _LOG_LINE.match(line)]
    errors = [i for i, line in enumerate(lines) if ": error: " in line]
    if lines and lines[0].startswith("usage:") and errors:
        lines = lines[errors[0]:]
    text = "\n".join(lines)
    for root in (directory.resolve(), directory, ws.root.resolve(), ws.root, REPO):
        text = text.replace(f"{root}/", "")
    return _DIGEST.sub("<sha256>", text)


def comparable(text: str) -> str:
    return _LONG_LIST.sub("[…]", text)


def documented_messages(doc: Path = DOC) -> dict[str, str]:
    """case id -> the message block under its heading in docs/errors.md."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    pattern = re.compile(r"^### `([^`]+)`.*?^```text\n(.*?)\n```", re.MULTILINE | re.DOTALL)
    return {m.group(1): m.group(2) for m in pattern.finditer(text)}


def render(cases: list[Case], messages: dict[str, str]) -> str:
    """docs/errors.md: every case under its category, in catalogue order."""
    out = [
        "# Error catalogue",
        "",
        "Every bad input below was run through the real command line, in a directory holding",
        "the files named; the message is what the command printed (paths are relative to that",
        "directory, digests shown as `<sha256>`). Each names the file or field, what was expected",
        "and what was found; none shows a traceback, and none writes, changes or deletes a file.",
        "Exit status 2 means bad input (1 for `verify`, which reports damaged shards).",
        "",
        "The list is produced and checked by `tests/errors/test_error_catalogue.py`: the test",
        "fails when a message differs from the one written here (lists of five or more items,",
        "such as the fields of a config, may differ). After changing a message,",
        "regenerate this file with",
        "",
        "    SPARSE_MOE_WRITE_ERROR_DOC=1 .venv/bin/python -m pytest -q tests/errors",
        "",
    ]
    categories: list[str] = []
    for case in cases:
        if case.category not in categories:
            categories.append(case.category)
    for category in categories:
        out += [f"## {category[0].upper()}{category[1:]}", ""]
        for case in (c for c in cases if c.category == category):
            out += [f"### `{case.id}`: {case.input}", "", f"    {case.command}", "",
                    f"exit status {case.code}" + (" (report on standard output)"
                                                  if case.stream == "stdout" else ""), "",
                    "```text", messages[case.id], "```", ""]
    return "\n".join(out)
