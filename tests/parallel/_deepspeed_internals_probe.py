"""Run by test_deepspeed_internals.py in a fresh process (one rank, gloo): exercises every
function of ``parallel/deepspeed_internals.py`` on a real engine with ZeRO-1 and prints what
each found, as JSON, for the test to check one by one."""

import json
import os
import sys
from pathlib import Path

import torch


def save_recording_writes(dsi, engine, directory: Path) -> tuple[list[str], list[str]]:
    """(the files the intercepted checkpoint engine was asked to write, the files on disk)."""
    written: list[str] = []

    def record(save, state, path):
        written.append(Path(path).name)
        save(state, path)

    dsi.intercept_checkpoint_writes(engine, record)
    engine.save_checkpoint(str(directory), tag="t", save_latest=False)
    return written, sorted(p.name for p in (directory / "t").iterdir())


def main(out: Path) -> None:
    from sparse_moe.models import lm_preset
    from sparse_moe.parallel import ExpertParallelConfig, parallelize
    from sparse_moe.parallel import deepspeed_internals as dsi
    from sparse_moe.parallel.groups import create_expert_parallel_groups, expert_group_name
    from sparse_moe.train.config import load_train_config
    from sparse_moe.train.distributed import init_distributed, shut_down_distributed
    from sparse_moe.train.engine import build_engine

    found: dict = {}
    init_distributed()
    groups = create_expert_parallel_groups(1)
    name = expert_group_name(1)
    found["groups"] = {
        "exists": dsi.expert_group_exists(name), "absent": dsi.expert_group_exists("ep_size_99"),
        "same": [dsi.expert_parallel_group(name) is groups.expert_parallel,
                 dsi.expert_data_parallel_group(name) is groups.expert_data_parallel,
                 dsi.data_parallel_group() is groups.data_parallel]}
    config = load_train_config(None, ["data.corpus=unused", f"run.dir={out}",
                                      "deepspeed.zero_stage=1", "optimizer.name=adam",
                                      "data.micro_batch_size=2"])
    model = parallelize(lm_preset("debug-moe", vocab_size=40), ExpertParallelConfig(), groups,
                        seed=0, device="cpu")
    run = build_engine(model, config, 1, out)
    engine, wrapper = run.engine, run.engine.optimizer
    partitions, params = dsi.flat_fp32_partitions(wrapper), dsi.low_precision_groups(wrapper)
    fragments = [dsi.fragment(p) for group in params for p in group]
    found["zero"] = {
        "partition_numel": sum(t.numel() for t in partitions),
        "fragment_numel": sum(f.numel for f in fragments if f is not None),
        "model_numel": sum(p.numel() for p in model.parameters()),
        "named": sorted(dsi.parameter_names(wrapper)[p] for group in params for p in group)
        == sorted(n for n, _ in model.named_parameters()),
        "group_size": torch.distributed.get_world_size(group=dsi.partition_group(wrapper, 0)),
        "client": dsi.wrapped_optimizer(wrapper) is run.optimizer,
        "linked": dsi.link_fragments_to_optimizer_state(wrapper),
        "fp16_without_zero": dsi.is_fp16_optimizer_without_zero(wrapper)}
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    loss = engine(tokens[:, :-1], targets=tokens[:, 1:]).token_nll.mean()
    engine.backward(loss)
    engine.step()
    written, on_disk = save_recording_writes(dsi, engine, out / "ckpt")
    zero_file = next(p for p in (out / "ckpt" / "t").iterdir() if "zero_pp_rank_0" in p.name)
    saved = dsi.read_zero_partition_file(zero_file)
    found["checkpoint"] = {
        "written": sorted(written), "on_disk": on_disk,
        "masters_numel": sum(t.numel() for t in saved.masters),
        "slices_numel": sum(f.numel for group in saved.slices for f in group.values()),
        "state_keys": sorted(k for k in saved.states[0] if torch.is_tensor(saved.states[0][k])),
        "slice_names": sorted(n for group in saved.slices for n in group)
        == sorted(n for n, _ in model.named_parameters())}
    # A model without MoE layers is saved by another path of the engine (save by keyword).
    dense = parallelize(lm_preset("debug-4xlstm", vocab_size=40), ExpertParallelConfig(), groups,
                        seed=0, device="cpu")
    dense_engine = build_engine(dense, config, 1, out).engine
    dense_written, dense_on_disk = save_recording_writes(dsi, dense_engine, out / "dense")
    found["checkpoint"]["dense_written"] = sorted(dense_written)
    found["checkpoint"]["dense_on_disk"] = dense_on_disk
    del dense_engine, dense
    before = dsi.skipped_steps(engine)
    dsi.set_step_counters(engine, 7, 70, 3)
    engine.backward(engine(tokens[:, :-1], targets=tokens[:, 1:]).token_nll.mean())
    engine.step()  # the engine counts on from the counters set
    found["engine"] = {"skipped_before": before, "global_steps": engine.global_steps,
                       "global_samples": engine.global_samples,
                       "skipped": dsi.skipped_steps(engine),
                       "csv_monitor": engine.monitor.enabled}
    headers = dsi.csv_monitor_files(engine.monitor)
    engine.monitor.write_events([("probe/value", 1.0, 1)])
    found["csv"] = {"list": isinstance(headers, list),
                    "after_write": "probe_value" in (dsi.csv_monitor_files(engine.monitor) or [])}
    state = engine.lr_scheduler.state_dict()
    found["lambda_lr"] = {key: isinstance(state.get(key), list)
                          and len(state[key]) == len(run.optimizer.param_groups)
                          for key in dsi.LAMBDA_LR_PER_GROUP_KEYS}
    os.environ["TORCH_EXTENSIONS_DIR"] = str(out / "extensions")  # made by the lookup
    build = dsi.extension_build_directory("probe_op")
    found["ops"] = {"compatible_is_bool": isinstance(dsi.op_compatible("no_such_op"), bool),
                    "build_dir": str(build.relative_to(out))}
    print("FOUND " + json.dumps(found))
    del engine, run, wrapper, model
    shut_down_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
