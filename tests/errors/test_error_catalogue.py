"""Every bad input in the catalogue fails with a message that names the file or field, what
was expected and what was found; no traceback; nothing written or destroyed; and the message
is the one docs/errors.md documents."""

from __future__ import annotations

import os

import pytest

from .catalogue import CASES, Case
from .harness import (
    DOC,
    comparable,
    documented_messages,
    message,
    render,
    run_in_process,
    run_subprocess,
    snapshot,
)
from .workspace import Workspace, build_workspace

WRITE_DOC = os.environ.get("SPARSE_MOE_WRITE_ERROR_DOC") == "1"
_observed: dict[str, str] = {}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    import deepspeed  # noqa: F401 - imported before any output is redirected (its logger binds)

    return build_workspace(tmp_path_factory.mktemp("catalogue"))


@pytest.fixture(scope="module")
def documented() -> dict[str, str]:
    yield documented_messages()
    if WRITE_DOC and len(_observed) == len(CASES):
        DOC.write_text(render(CASES, _observed), encoding="utf-8")


@pytest.fixture
def no_engines(monkeypatch):
    """A case whose checks pass by mistake must fail, not start training in this process."""
    import sparse_moe.train.trained as trained
    import sparse_moe.train.trainer as trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the input checks passed; the case expected them to fail")

    monkeypatch.setattr(trainer, "Trainer", refuse)
    monkeypatch.setattr(trained, "init_distributed", refuse)
    saved = dict(os.environ)  # the launcher-variable defaults set by the checks
    yield
    os.environ.clear()
    os.environ.update(saved)


def _without_fp16(monkeypatch) -> None:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.is_fp16_supported():  # on a GPU: stand in for an accelerator without fp16
        monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: False)


def test_catalogue_is_large_and_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    assert {c.program for c in CASES if c.subprocess} == {
        "sparse-moe-train", "python -m data_prep", "sparse-moe-generate", "sparse-moe-report",
        "sparse-moe-plan"}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, workspace, documented, no_engines, tmp_path, monkeypatch):
    directory = tmp_path / "case"
    directory.mkdir()
    case.setup(workspace, directory)
    if case.fp16_unsupported:
        _without_fp16(monkeypatch)
    before = snapshot(directory)

    outcome = (run_subprocess if case.subprocess else run_in_process)(case, directory)

    printed = outcome.stdout + outcome.stderr
    assert outcome.code == case.code, printed
    assert "Traceback" not in printed, printed
    shown = message(case, outcome, directory, workspace)
    for name in case.names:
        assert name in shown, f"the message does not name {name!r}:\n{shown}"
    assert case.expected in shown, f"no expectation {case.expected!r} in:\n{shown}"
    assert case.found in shown, f"no finding {case.found!r} in:\n{shown}"
    assert snapshot(directory) == before, "the command wrote, changed or deleted files"
    _observed[case.id] = shown
    if not WRITE_DOC:
        assert comparable(documented.get(case.id, "")) == comparable(shown), (
            f"docs/errors.md documents another message for {case.id} (regenerate it with "
            f"SPARSE_MOE_WRITE_ERROR_DOC=1):\n{shown}")
