"""The GPU check's CPU-side parts: options, the peak table, pytest's counts, the table, and
every section run end to end at toy size on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402  (benchmarks/gpu_check.py)


def test_defaults_are_the_full_sizes_and_tiny_the_toy_ones():
    full = gpu_check.parse_args([])
    assert full.device == "cuda" and full.experts == [16, 64, 256]
    assert full.rows_per_expert == [512, 2048] and full.sizes["moe"] == "moe-32"
    assert full.sizes["dense"] == "moe-1-wide"
    tiny = gpu_check.parse_args(["--tiny", "--device", "cpu", "--experts", "2", "3"])
    assert tiny.experts == [2, 3] and tiny.sizes["tokens"] < full.sizes["tokens"]


@pytest.mark.parametrize("argv,message", [
    (["--experts", "0", "16"], "--experts: expected positive counts, found [0, 16]"),
    (["--rows-per-expert", "-1"], "--rows-per-expert: expected positive counts, found [-1]"),
    (["--train-steps", "1"], "--train-steps: expected 2 or more"),
    (["--skip", "everything"], "invalid choice: 'everything'"),
])
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H200", 989.4),
    ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.1),
    ("NVIDIA L4", 121.0), ("NVIDIA B200", 2250.0), ("Tesla K40m", None),
])
def test_bf16_peak_by_device_name(name, peak):
    assert gpu_check.peak_tflops(name) == peak


@pytest.mark.parametrize("output,counts", [
    ("...\n3 passed, 2 skipped in 4.1s\n", dict(passed=3, skipped=2)),
    ("F.\nFAILED tests/cuda/x.py::t - boom\n1 failed, 1 passed, 1 error in 2s\n",
     dict(passed=1, failed=1, error=1)),
    ("11 skipped, 40 deselected in 3.0s", dict(skipped=11, deselected=40)),
    ("", {}),
])
def test_pytest_summary_counts(output, counts):
    expected = {**dict(passed=0, failed=0, skipped=0, error=0, deselected=0), **counts}
    assert gpu_check.pytest_counts(output) == expected


def test_table_columns_line_up():
    rows = [gpu_check.Row("layer", "16 experts", "1.00 ms", "1.05x dense ideal", "note"),
            gpu_check.Row("environment", "GPU", "NVIDIA H200")]
    lines = gpu_check.render(rows).splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[0].split("|")[1].strip() == "section" and set(lines[1]) <= {"|", "-"}
    assert [line.split("|")[3].strip() for line in lines[2:]] == ["1.00 ms", "NVIDIA H200"]


def _plan(preset: str, *extra: str):
    return gpu_check.contender_plan([f"model.preset={preset}", "data.micro_batch_size=4",
                                     "data.seq_len=16", *extra], "cuda", vocab_size=8000)


def test_model_flops_of_the_compute_matched_pair_agree():
    """MoE-1-Wide is built to do MoE-32's multiply-adds per token (k=4 experts of 1024 units
    against one of 4096), so their training FLOPs per token agree, softmax included; the
    count is 6 x (the LSTMs' 4 gates of 512 x 1024 each, twice, and 4 experts of 512 x 1024
    x 2) plus the softmax, per token, within the gates' small share."""
    moe = gpu_check.flops_per_token(_plan("moe-32"))
    wide = gpu_check.flops_per_token(_plan("moe-1-wide"))
    assert moe == pytest.approx(wide, rel=0.05)
    by_hand = 6 * (2 * 4 * 512 * 1024 + 4 * 2 * 512 * 1024 + 512 * 8000)
    assert moe == pytest.approx(by_hand, rel=0.05)


def test_memory_notes_compare_like_with_like():
    plan = _plan("moe-32", "deepspeed.config=ds_configs/zero1_bf16.json")
    tensors = (plan.bytes_per_rank["total"] - plan.bytes_per_rank["framework"]) / 2**20
    gpu = gpu_check.memory_note({"peak_device_mib": tensors * 1.1,
                                 "peak_device_reserved_mib": tensors * 1.3}, plan, "cuda")
    assert gpu.endswith("(1.10x)") and "allocated" in gpu and "reserved" in gpu
    cpu = gpu_check.memory_note({"peak_rss_mib": plan.bytes_per_rank["total"] / 2**20 / 2}, plan,
                                "cpu")
    assert cpu.endswith("(0.50x)") and "resident" in cpu


def test_every_section_runs_at_toy_size_on_the_cpu(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--device", "cpu",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    sections = {row["section"] for row in rows}
    assert sections == {"environment", "cuda tests", "layer", "expert gemm", "training"}
    assert [row for row in rows if row["value"] in ("error", "timed out")] == []
    tests = next(row for row in rows if row["section"] == "cuda tests")
    counts = gpu_check.pytest_counts(tests["value"].replace(",", ""))
    if not torch.cuda.is_available():
        assert counts["passed"] == counts["failed"] == 0 and counts["skipped"] >= 8
    layer = [row for row in rows if row["section"] == "layer"]
    assert [row["item"] for row in layer] == ["4 experts, k=2", "8 experts, k=2"]
    assert all("x dense ideal" in row["versus"] for row in layer)
    moe = next(r for r in rows if r["item"] == "debug-moe")
    assert "x debug-dense" in moe["versus"] and "MiB resident; plan" in moe["note"]
    assert proc.stdout.count("\n") == len(rows) + 2  # the table alone on standard output


def test_the_script_refuses_a_machine_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run")  # the refusal needs none
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "sees no GPU" in proc.stderr and "make install" in proc.stderr
    direct = gpu_check.main(["--device", "cuda"])
    assert direct == 2


def test_an_interrupted_check_still_prints_what_it_measured(monkeypatch, capsys):
    """gpu_check.sh ends the check with SIGINT at its time limit: the rows so far are printed."""
    def slow(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check, "layer_rows", slow)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--skip", "tests"]) == 0
    table = capsys.readouterr().out
    assert "| environment" in table and "| layer" in table and "interrupted" in table
    assert "| training" not in table and "skipped" in table  # the tests row says --skip
