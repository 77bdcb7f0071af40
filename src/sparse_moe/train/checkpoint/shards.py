"""Which global experts a rank's stacked expert tensors hold: the one description of a shard.

A MoE layer's experts live in ``GroupedFFNExperts`` tensors of shape ``[E_local, ...]``; the rank
that owns experts ``first .. first + E_local - 1`` holds those rows. Export (stacking every
rank's files), relayout (re-splitting optimizer state) and ``run.init_from`` (reading one
rank's rows of an export) all slice by this.
"""

from __future__ import annotations

from torch import nn

from sparse_moe.moe import GroupedFFNExperts


def expert_blocks(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Parameter name -> (first global expert, local experts) of every stacked expert tensor."""
    blocks = {}
    for module_name, module in model.named_modules():
        if isinstance(module, GroupedFFNExperts):
            for name, _ in module.named_parameters():
                blocks[f"{module_name}.{name}"] = (module.first_expert, module.num_experts)
    return blocks
