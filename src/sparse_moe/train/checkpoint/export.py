"""An export: one consolidated model out of a run's DeepSpeed checkpoint, and its readers.

``export_run`` (the library of ``sparse-moe-export``, ``train/export.py``) writes, readable
with ``safetensors`` alone (no DeepSpeed, no process groups):

- ``model.safetensors``: every parameter under the plain model's names (``build_model(config)
  .state_dict()``: ``embedding.weight``, ``layers.0.lstm.weight_ih_l0``,
  ``layers.1.moe.router.w_gate``, ``layers.1.moe.experts.weights.0`` of shape
  ``[num_experts, d_in, d_out]`` with every expert, in global order, ...);
- ``config.json``: the model's config (``type``: ``lm`` or ``translation``, then its fields);
- the tokenizer file the run was trained with.

The export is read straight from DeepSpeed's files: the dense weights from
``mp_rank_00_model_states.pt``, each expert from its own file, stacked. Training can start
from an export at any layout (``run.init_from=DIR``: each rank reads only its experts), and
generation loads one (``sparse-moe-generate DIR``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from sparse_moe.atomic import atomic_write
from sparse_moe.train.checkpoint.errors import ExportError
from sparse_moe.train.checkpoint.files import (
    checkpoint_dir,
    checkpoint_tags,
    expert_files,
    load_model_states,
    read_latest,
)
from sparse_moe.train.checkpoint.shards import expert_blocks

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_WRAPPED = ".deepspeed_moe."
_EXPERT_KEY = re.compile(r"^(?P<layer>.*)\.deepspeed_moe\.experts\.deepspeed_experts\."
                         r"(?P<expert>\d+)\.(?P<name>.+)$")


def plain_name(name: str) -> str:
    """A parameter's name in the plain model (without DeepSpeed's MoE wrapper)."""
    return name.replace(_WRAPPED, ".")


def consolidated_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every parameter of a checkpoint under its plain name, each MoE layer's experts stacked."""
    states = load_model_states(tag_dir)
    tensors = {plain_name(k): v for k, v in states["module"].items()}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for path in expert_files(tag_dir, list(states.get("num_experts") or [])):
        for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
            match = _EXPERT_KEY.match(key)
            if match is None:
                raise ExportError(f"{path}: expected DeepSpeed expert keys "
                                  f"'<layer>.deepspeed_moe.experts.deepspeed_experts.<e>.<name>', "
                                  f"found {key!r}")
            stacked = f"{match['layer']}.experts.{match['name']}"
            experts.setdefault(stacked, {})[int(match["expert"])] = value
    for name, rows in experts.items():
        if sorted(rows) != list(range(len(rows))):
            raise ExportError(f"{tag_dir}: {name}: expected experts 0..{len(rows) - 1}, found "
                              f"{sorted(rows)}")
        tensors[name] = torch.stack([rows[e] for e in range(len(rows))])
    return tensors


def export_run(run_dir: Path, out: Path, model_config: Any, tokenizer_path: Path | None,
               tag: str | None = None) -> list[Path]:
    """Writes the export of ``run_dir``'s checkpoint ``tag`` (default: latest) into ``out``;
    ``model_config`` and ``tokenizer_path`` are the run's (``trained.run_model_config``)."""
    from safetensors.torch import save_file

    tag_dir = _tag_dir(run_dir, tag)
    tensors = consolidated_state(tag_dir)
    _check_names(tensors, model_config, tag_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS
    tmp = out / f".{WEIGHTS}.tmp"
    save_file({k: v.contiguous() for k, v in _unshared(tensors).items()}, str(tmp),
              metadata={"format": "pt", "source": str(tag_dir)})
    tmp.replace(weights)
    kind = "translation" if type(model_config).__name__ == "TranslationConfig" else "lm"
    atomic_write(out / CONFIG, json.dumps({"type": kind, **model_config.to_dict()}, indent=2))
    written = [weights, out / CONFIG]
    if tokenizer_path is not None:
        shutil.copy2(tokenizer_path, out / tokenizer_path.name)
        written.append(out / tokenizer_path.name)
    return written


def _tag_dir(run_dir: Path, tag: str | None) -> Path:
    directory = checkpoint_dir(run_dir)
    tag = tag or read_latest(directory)
    if tag is None or not (directory / tag).is_dir():
        raise ExportError(f"{directory}: expected a checkpoint{f' {tag!r}' if tag else ''}, "
                          f"found {checkpoint_tags(directory) or 'none'}")
    return directory / tag


def _check_names(tensors: dict[str, torch.Tensor], model_config: Any, tag_dir: Path) -> None:
    from sparse_moe.models import build_model

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(model_config).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        differ = sorted(set(expected) ^ set(found)) or sorted(
            k for k in expected if expected[k] != found[k])
        raise ExportError(f"{tag_dir}: expected the parameters of the run's model, found "
                          f"differences in {differ[:4]}")


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): each gets its own."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


# ---------------------------------------------------------------- reading an export
def is_export(directory: Path) -> bool:
    return (directory / WEIGHTS).is_file() and (directory / CONFIG).is_file()


def export_model_config(directory: Path):
    """The model config an export was written with."""
    from sparse_moe.models import LMConfig, TranslationConfig

    if not is_export(directory):
        raise ExportError(f"{directory}: expected an export ({WEIGHTS} and {CONFIG}, written by "
                          "sparse-moe-export), found none")
    values = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    kind = values.pop("type", "lm")
    cls = TranslationConfig if kind == "translation" else LMConfig
    return cls.from_dict(values, source=str(directory / CONFIG))


def check_export(directory: Path, model_config: Any) -> None:
    """The export holds every parameter of ``model_config`` with its shape (the header only)."""
    from safetensors import safe_open

    from sparse_moe.models import build_model

    if not is_export(directory):
        raise ExportError(f"run.init_from: {directory}: expected an export ({WEIGHTS} and "
                          f"{CONFIG}, written by sparse-moe-export), found none")
    with torch.device("meta"):
        expected = {k: list(v.shape) for k, v in build_model(model_config).state_dict().items()}
    with safe_open(str(directory / WEIGHTS), framework="pt") as file:
        found = {k: list(file.get_slice(k).get_shape()) for k in file.keys()}
    wrong = [f"{k}: expected {expected[k]}, found {found.get(k, 'no such tensor')}"
             for k in expected if found.get(k) != expected[k]]
    if wrong:
        raise ExportError(f"run.init_from: {directory / WEIGHTS}: written for another model: "
                          + "; ".join(wrong[:3]) + (f" (and {len(wrong) - 3} more)"
                                                    if len(wrong) > 3 else "")
                          + f". Build the same model (model.preset={directory / CONFIG})")


def load_export_into(model: torch.nn.Module, directory: Path) -> int:
    """Copies an export's weights into a model built by ``parallelize`` at any layout.

    Dense parameters are read whole; each MoE layer's experts only for this rank's block
    (``safe_open`` reads slices, so a rank never reads another rank's experts). Returns the
    number of parameters loaded. Fails naming the tensor on a missing or misshapen one.
    """
    from safetensors import safe_open

    loaded = 0
    with safe_open(str(directory / WEIGHTS), framework="pt") as file:
        names = set(file.keys())
        blocks = expert_blocks(model)
        for name, param in model.named_parameters():
            plain = plain_name(name)
            if plain not in names:
                raise ExportError(f"{directory / WEIGHTS}: expected a tensor {plain!r} (this "
                                  "model's parameter), found none")
            if name in blocks:
                first, count = blocks[name]
                value = file.get_slice(plain)[first:first + count]
            else:
                value = file.get_tensor(plain)
            if tuple(value.shape) != tuple(param.shape):
                raise ExportError(f"{directory / WEIGHTS}: {plain}: expected shape "
                                  f"{list(param.shape)}, found {list(value.shape)}")
            with torch.no_grad():
                param.copy_(value)
            loaded += param.numel()
    return loaded
