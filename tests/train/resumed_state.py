"""Run by torchrun: resume a run at the configured layout, then write this rank's state.

Writes ``<out>/rank<r>.pt``: for every parameter, its name, its block of global experts (or
none), the parameter itself and its optimizer state as the live objects hold it: the client
optimizer's state when DeepSpeed left it unwrapped, otherwise the fp32 master read back
through DeepSpeed's public ``safe_get_full_*`` API and the moments through it or, for
FactoredAdam's factored partitions, ``FactoredAdam.full_moments``. Trains nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(out: str, overrides: list[str]) -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from sparse_moe.train.checkpoint.relayout import link_optimizer_state
    from sparse_moe.train.checkpoint.shards import expert_blocks
    from sparse_moe.train.config import load_train_config
    from sparse_moe.train.distributed import shut_down_distributed
    from sparse_moe.train.trainer import Trainer

    trainer = Trainer(load_train_config(None, overrides + ["run.resume=true"]))
    model, run = trainer.engine.module, trainer.run_engine
    blocks = expert_blocks(model)
    if run.optimizer_wrapped:
        link_optimizer_state(trainer.engine)
    state = {}
    for name, param in model.named_parameters():
        if run.optimizer_wrapped:
            factored = getattr(run.optimizer, "full_moments", lambda _: None)(name)
            held = {"fp32": safe_get_full_fp32_param(param),
                    **(factored or {"exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq")})}
        else:
            held = {k: v for k, v in run.optimizer.state[param].items() if torch.is_tensor(v)}
        state[name] = {"block": blocks.get(name), "param": param.detach().clone(),
                       "state": {k: v.detach().clone() for k, v in held.items()}}
    step = {"step": trainer.step, "lr": trainer.engine.get_lr(),
            "global_steps": trainer.engine.global_steps,
            "data": trainer.batches.state_dict()}
    torch.save({"params": state, "counters": step}, Path(out) / f"rank{dist.get_rank()}.pt")
    del trainer, model, run
    shut_down_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
