"""The prepared GPU check: its arithmetic by hand, and the whole script on a CPU with a tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from apiana_lab.bench.gpu import (
    Forward,
    GpuPeak,
    ModelShape,
    compare_memory,
    decode_bytes,
    gpu_peak,
    model_folder,
    model_shape,
    oom_memory_cap,
    prefill_flops,
    throughput,
    vendor_wheel,
)

REPO = Path(__file__).resolve().parents[1]
STATUSES = {"ok", "failed", "cut", "skipped", "not available"}


def test_prefill_flops_and_decode_bytes_by_hand():
    shape = ModelShape(
        params=0, layer_params=1_000_000, head_params=10_000, weight_bytes=2_000_000, kv_bytes_per_token=100
    )
    calls = [
        Forward(rows=2, positions=50, context=50, head_positions=1, seconds=0.5),
        Forward(rows=2, positions=1, context=51, head_positions=1, seconds=0.01),
        Forward(rows=2, positions=1, context=52, head_positions=1, seconds=0.01),
    ]
    # Prefill: 2 x 1e6 x (2 rows x 50 positions) + 2 x 1e4 x (2 rows x 1 head position) = 200,040,000.
    assert prefill_flops(shape, calls) == 200_040_000
    # Decode: (2e6 + 100 x 2 x 51) + (2e6 + 100 x 2 x 52) = 2,010,200 + 2,010,400.
    assert decode_bytes(shape, calls) == 4_020_600
    figures = throughput(shape, calls, GpuPeak("card", bf16_tflops=0.8, bandwidth_gbs=0.4))
    assert figures["prefill_flop_per_s"] == pytest.approx(400_080_000)
    assert figures["prefill_share_of_peak"] == pytest.approx(400_080_000 / 0.8e12)
    assert figures["decode_bytes_per_s"] == pytest.approx(201_030_000)
    assert figures["decode_share_of_bandwidth"] == pytest.approx(201_030_000 / 0.4e9)
    assert (figures["prefill_tokens"], figures["decode_steps"], figures["decode_tokens"]) == (100, 2, 4)
    assert figures["decode_tokens_per_s"] == pytest.approx(200)
    unknown = throughput(shape, calls, None)
    assert unknown["prefill_share_of_peak"] is None and unknown["decode_share_of_bandwidth"] is None


@pytest.mark.parametrize("tied", [True, False])
def test_model_shape_counts_a_real_model(tied):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=100,
        tie_word_embeddings=tied,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    shape = model_shape(model, kv_itemsize=4)
    # A layer: q, o 64x64; k, v 64x32; gate, up, down 64x128; two norms of 64. Then the final norm.
    layers = 2 * (2 * 4096 + 2 * 2048 + 3 * 8192 + 2 * 64) + 64
    assert shape.layer_params == layers == 74_048
    assert shape.head_params == 6_400
    assert shape.params == layers + 6_400 * (1 if tied else 2)
    # Decode reads every weight but the input embedding's, which the tied head reads anyway (float32: 4 bytes).
    assert shape.weight_bytes == (layers + 6_400) * 4
    assert shape.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4


@pytest.mark.parametrize(
    "name, card",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
        ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A10G", "A10 (A10G: the A10's datasheet)"),
        ("Tesla T4", None),
    ],
)
def test_gpu_peak_is_picked_by_device_name(name, card):
    peak = gpu_peak(name)
    assert (peak.name if peak else None) == card


def test_h100_and_h200_limits():
    h100 = gpu_peak("NVIDIA H100 80GB HBM3")
    assert (h100.bf16_tflops, h100.bandwidth_gbs) == (989.0, 3350.0)
    assert gpu_peak("NVIDIA H200").bandwidth_gbs == 4800.0


def test_oom_memory_cap_leaves_room_for_a_few_rows():
    # 15 GB held, rows of 0.3 GB, room for 1.5 x 4 rows: (15 + 1.8) / 80.
    assert oom_memory_cap(80_000_000_000, 15_000_000_000, 300_000_000, rows_that_fit=4) == pytest.approx(0.21)
    assert oom_memory_cap(10, 9, 100) == 1.0
    with pytest.raises(ValueError):
        oom_memory_cap(0, 0, 1)


def test_compare_memory_agrees_within_tolerance_and_says_why_not():
    pd = pytest.importorskip("pandas")
    torch_mb = [0.0, 15_000.0, 15_500.0, 20_000.0, 20_000.0]
    frame = pd.DataFrame(
        {
            "gpu0_used_mb": [600.0, 15_700.0, 16_100.0, 20_650.0, 20_700.0],
            "gpu_process_mb": [float("nan")] * 5,
            "torch_reserved_mb": torch_mb,
            "torch_allocated_mb": [0.0, 14_800.0, 15_000.0, 19_000.0, 18_000.0],
        }
    )
    agreed = compare_memory(frame)
    assert agreed["ok"], agreed
    assert agreed["nvml_column"] == "gpu0_used_mb" and agreed["samples"] == 5
    assert agreed["nvml_minus_torch_median_mb"] == pytest.approx(650.0)
    apart = frame.assign(gpu0_used_mb=frame["gpu0_used_mb"] + 5_000.0)
    verdict = compare_memory(apart)
    assert not verdict["ok"] and verdict["reason"] == "only 0% of samples agree"
    zero = frame.assign(torch_reserved_mb=0.0)
    assert compare_memory(zero)["reason"] == "a series is zero"
    assert compare_memory(frame.drop(columns=["torch_reserved_mb"]))["ok"] is False


def test_vendor_wheel_keeps_one_cuda_major(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in (
            "pkg/__init__.py",
            "pkg/libpkg_cpu.so",
            "pkg/libpkg_cuda130.so",
            "pkg/libpkg_cuda128.so",
            "pkg/libpkg_rocm72.so",
            "pkg-1.0.dist-info/METADATA",
        ):
            archive.writestr(name, "x")
    written = vendor_wheel(wheel, tmp_path / "vendor", cuda_major=13)
    assert sorted(written) == [
        "pkg-1.0.dist-info/METADATA",
        "pkg/__init__.py",
        "pkg/libpkg_cpu.so",
        "pkg/libpkg_cuda130.so",
    ]
    assert (tmp_path / "vendor" / "pkg" / "libpkg_cuda130.so").is_file()
    assert not (tmp_path / "vendor" / "pkg" / "libpkg_cuda128.so").exists()


def test_model_folder_sizes_the_7b_shape_to_the_carried_tokenizer(tmp_path):
    changed = model_folder("mistral-7b", tmp_path)
    assert changed == {"vocab_size": [32000, 49152]}
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("mistral", 4096, 32)
    assert (config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (8, 14336, 49152)
    assert (config["eos_token_id"], config["pad_token_id"]) == (2, 2)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "chat_template.jinja").is_file()


def _numbers(value):
    """Every number in a JSON value, nested or not."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


@pytest.mark.slow
def test_the_check_runs_on_a_cpu_with_a_tiny_config(tmp_path):
    # As on the GPU machine: the tree on PYTHONPATH, no network, no vendored packages.
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "apiana_lab.bench.gpu",
            "--tiny",
            "--out",
            str(tmp_path),
            "--vendor",
            str(tmp_path / "no-vendor"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("gpu-cpu-*.json")
    results = json.loads(json_path.read_text())
    assert json_path.with_suffix(".md").read_text().startswith("# GPU check: CPU")
    steps = {row["step"]: row for row in results["steps"]}
    assert list(steps) == [
        "tiny default batch",
        "tiny batch auto",
        "oom drill (tiny)",
        "monitor (NVML vs torch.cuda)",
        "load_in_8bit (tiny)",
    ]
    assert all(row["status"] in STATUSES for row in steps.values()), steps
    assert results["complete"] is True
    run = steps["tiny default batch"]
    assert run["status"] == "ok", run
    f = run["figures"]
    # Six chunks with four new tokens each, forced: one prefill pass of six rows, then three decode steps.
    assert (f["done"], f["failed"], f["completion_tokens"]) == (6, 0, 24)
    assert (f["prefill_forwards"], f["prefill_rows_max"], f["decode_steps"]) == (1, 6, 3)
    assert f["prefill_flop_per_s"] > 0 and f["decode_bytes_per_s"] > 0
    assert f["prompt_tokens"] >= 6 * 1000  # real-length chunks, plus the prompt around them
    assert steps["tiny batch auto"]["status"] in ("ok", "not available")
    assert steps["oom drill (tiny)"]["status"] == "skipped" and steps["oom drill (tiny)"]["figures"]["row_bytes"] > 0
    monitor = steps["monitor (NVML vs torch.cuda)"]
    assert monitor["figures"]["samples"] >= 1 and monitor["figures"]["rss_peak_mb"] > 0
    assert all(n >= 0 for n in _numbers(results["steps"]))
    # The one-screen summary: the device, one line per step, the totals.
    out = proc.stdout.splitlines()
    assert out[0].startswith("GPU check on CPU")
    assert [line.split()[0] for line in out[3:8]] == ["tiny", "tiny", "oom", "monitor", "load_in_8bit"]
    assert out[-1].startswith(f"{1 + (steps['tiny batch auto']['status'] == 'ok')}/5 steps ok")
    assert len(out) <= 25
