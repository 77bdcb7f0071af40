"""The commands the README and the launch documents show, checked the way their programs read
them: every ``bash`` block of README.md, docs/training.md, docs/launch.md and slurm/README.md.

- ``sparse-moe-train`` (also under ``python -m``, ``torchrun ... -m`` and ``deepspeed
  --module``): the launcher's own argument parser (torch's, DeepSpeed's), then the trainer's,
  then every ``section.field=value`` through the config loader (a field that does not exist,
  or a value of the wrong type, fails); a ``--config`` file in the repository is loaded too.
- ``sparse-moe-plan``, ``sparse-moe-data``, ``sparse-moe-report``: their parsers.
- ``sbatch slurm/X.sbatch``: the template exists, every variable the command sets is one the
  template reads, and a training template gets the CONFIG it requires.

Commands that need a cluster, a GPU or a download to run cannot run here; these checks catch
what made them fail as written (``deepspeed -m``, a renamed field, a template variable that
no longer exists).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/training.md", "docs/launch.md", "slurm/README.md"]
TRAINING_TEMPLATES = {"train_torchrun.sbatch", "train_srun.sbatch", "train_deepspeed.sbatch",
                      "sweep.sbatch"}
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def bash_commands(path: Path) -> list[str]:
    """Each command of the file's ``bash`` blocks, continuation lines joined."""
    commands, block, pending = [], False, ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            block = stripped == "```bash"
            continue
        if not block:
            continue
        pending += stripped
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending:
            commands.append(pending)
        pending = ""
    return commands


def words(command: str) -> list[str]:
    """The first command's words (up to a pipe or ``&&``): ``name=$(...)`` unwrapped,
    ``...`` placeholders dropped."""
    match = re.match(r"^\w+=\$\((.*)\)$", command)
    if match:
        command = match.group(1)
    out = []
    for word in shlex.split(command, comments=True):
        if word in ("|", "||", "&&", ";"):
            break
        if word != "...":
            out.append(word)
    return out


def _quiet(call, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return call(*args)


def check_trainer_arguments(args: list[str]) -> None:
    from sparse_moe.config_io import ConfigError
    from sparse_moe.train.cli import parse_args
    from sparse_moe.train.config import load_train_config

    parsed = _quiet(parse_args, args)
    config = parsed.config if parsed.config and (REPO / parsed.config).is_file() else None
    overrides = list(parsed.overrides)
    if config is None:
        overrides.append("data.corpus=corpus-named-by-the-command")
    try:
        load_train_config(str(REPO / config) if config else None, overrides)
    except ConfigError as error:
        raise AssertionError(f"sparse-moe-train {' '.join(args)}: {error}") from None


def check_torchrun(args: list[str]) -> None:
    from torch.distributed.run import get_args_parser

    parsed = _quiet(get_args_parser().parse_args, args)
    assert parsed.module and parsed.training_script == "sparse_moe.train", args
    check_trainer_arguments(parsed.training_script_args)


def check_deepspeed(args: list[str]) -> None:
    from deepspeed.launcher.runner import parse_args

    parsed = _quiet(parse_args, args)
    assert parsed.module and parsed.user_script == "sparse_moe.train", (
        f"deepspeed {' '.join(args)}: expected --module sparse_moe.train")
    check_trainer_arguments(parsed.user_args)


def check_plan(args: list[str]) -> None:
    from sparse_moe.plan.cli import build_parser, load_config

    parsed = _quiet(build_parser().parse_intermixed_args, args)
    config = parsed.config if parsed.config and (REPO / parsed.config).is_file() else None
    load_config(str(REPO / config) if config else None, list(parsed.overrides))


def check_data(args: list[str]) -> None:
    from data_prep.cli import build_parser

    _quiet(build_parser().parse_args, args)


def template_variables(template: Path) -> set[str]:
    """The variables a template reads, itself or through the files it sources."""
    text = template.read_text()
    for helper in ("lib.sh", "env.sh", "node_torchrun.sh"):
        text += (template.parent / helper).read_text()
    return set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", text))


def check_sbatch(args: list[str], assigned: dict[str, str], exported: set[str]) -> None:
    script = next(a for a in args if a.endswith(".sbatch"))
    template = REPO / script
    assert template.is_file(), f"sbatch {script}: no such template"
    for option in args:
        if option.startswith("--export="):
            for item in option.split("=", 1)[1].split(","):
                if "=" in item:
                    assigned[item.split("=", 1)[0]] = item.split("=", 1)[1]
    unknown = set(assigned) - template_variables(template)
    assert not unknown, f"sbatch {script}: {sorted(unknown)} are not read by the template"
    if template.name in TRAINING_TEMPLATES:
        assert "CONFIG" in assigned or "CONFIG" in exported, (
            f"sbatch {script}: the template requires CONFIG, and the command does not set it")


def check_document(path: Path) -> int:
    """Checks every command of ``path``; returns how many were checked."""
    checked, exported = 0, set()
    for command in bash_commands(path):
        argv = words(command)
        assigned = {}
        while argv and ASSIGNMENT.match(argv[0]):
            name, _, value = argv.pop(0).partition("=")
            assigned[name] = value
        if not argv:
            continue
        program, args = argv[0], argv[1:]
        if program == "export":
            exported |= {a.split("=", 1)[0] for a in args}
            continue
        program = program.rsplit("/", 1)[-1]
        if program == "sparse-moe-train":
            check_trainer_arguments(args)
        elif program in ("python", "python3") and args[:2] == ["-m", "sparse_moe.train"]:
            check_trainer_arguments(args[2:])
        elif program == "torchrun":
            check_torchrun(args)
        elif program == "deepspeed":
            check_deepspeed(args)
        elif program == "sparse-moe-plan":
            check_plan(args)
        elif program == "sparse-moe-data":
            check_data(args)
        elif program == "sbatch":
            check_sbatch(args, assigned, exported)
        else:
            continue
        checked += 1
    return checked


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_parse_as_their_programs_read_them(doc):
    assert check_document(REPO / doc) >= 2, f"{doc}: expected commands to check"


def test_the_checks_catch_what_broke_commands_before():
    with pytest.raises(AssertionError, match="expected --module sparse_moe.train"):
        check_deepspeed(["--num_gpus", "8", "sparse_moe.train"])
    with pytest.raises(SystemExit):  # DeepSpeed's launcher has no -m
        check_deepspeed(["--num_gpus", "8", "-m", "sparse_moe.train"])
    with pytest.raises(AssertionError, match="unknown RunConfig field"):
        check_trainer_arguments(["run.stpes=5"])
    with pytest.raises(AssertionError, match="requires CONFIG"):
        check_sbatch(["slurm/train_torchrun.sbatch"], {}, set())
    with pytest.raises(AssertionError, match=r"\['DS_MULTINODE_LAUNCHER'\] are not read"):
        check_sbatch(["slurm/train_deepspeed.sbatch"], {"CONFIG": "c.yaml",
                                                        "DS_MULTINODE_LAUNCHER": "slurm"}, set())
