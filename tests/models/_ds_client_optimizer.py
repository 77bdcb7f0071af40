"""Run by test_deepspeed_client_optimizer.py in a fresh process (one rank, gloo on CPU)."""

import json
import os
import socket
import sys

import torch


def main(stage: int) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    from sparse_moe.models import MoELSTMLanguageModel, compose_loss, lm_preset
    from sparse_moe.optim import FactoredAdam, ScheduleConfig, build_scheduler
    from sparse_moe.parallel.startup import load_deepspeed_comm_ops

    # DeepSpeed's CPU op: the environment's build, as every start in the project loads it
    # (torch's shared default would be rebuilt for each environment that loads it).
    load_deepspeed_comm_ops()

    torch.manual_seed(0)
    model = MoELSTMLanguageModel(lm_preset("debug-moe", vocab_size=50))
    optimizer = FactoredAdam(model.parameters(), lr=0.01)
    scheduler = build_scheduler(optimizer, ScheduleConfig(warmup_steps=2, hold_steps=0))
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=config)
    tokens = torch.randint(0, 50, (4, 13), generator=torch.Generator().manual_seed(1))
    losses, lrs = [], []
    for _ in range(15):
        parts = compose_loss(engine(tokens[:, :-1]), tokens[:, 1:])
        engine.backward(parts.total)
        engine.step()
        losses.append(float(parts.cross_entropy.detach()))
        lrs.append(engine.get_lr()[0])
    state_keys = sorted({k for s in optimizer.state.values() for k in s})
    print("RESULT " + json.dumps({"losses": losses, "lrs": lrs, "state_keys": state_keys}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
