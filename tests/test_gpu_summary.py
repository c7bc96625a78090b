"""benchmarks/gpu_summary.py: gpu.json states what the GPU check measured on that machine, and nothing it did not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_summary import pytest_counts, store_rate, summarise  # noqa: E402


def _check_output(out: Path, run_dir: Path, epochs_done: int, landed: bool) -> None:
    out.mkdir(parents=True)
    (out / "gpu.txt").write_text("NVIDIA H200, 143771 MiB, 580.65.06\ntorch 2.11.0+cu130 timm 1.0.20\n")
    (out / "cuda_tests.txt").write_text("....F.F.....\nFAILED tests/test_a.py::x - 3 passed in a message\n"
                                        "2 failed, 17 passed, 1 skipped, 1 error in 41.20s\n")
    (out / "study.log").write_text(
        "precompute: 64,256 of 1,500,000 views, 8,102 views/s, 0/2 shards written\n"   # unfinished: not the rate
        "precompute: shard 2/2 written, 1,500,000 of 1,500,000 views, 9,433.5 views/s\n"
        "[study 10:00:00] run 1/2: both-v300-s0 (store ...): running\n")
    # timings.json sums every machine's time: the committed CPU share must not count as the GPU's
    (out / "timings_before.json").write_text(json.dumps({"store stores/seed0-ab": 3806.5, "run both-m100-s0": 2066.4}))
    (out / "timings_after.json").write_text(json.dumps({"store stores/seed0-ab": 3966.5, "run both-m100-s0": 2066.4,
                                                        "run both-v300-s0": 300.0,
                                                        "store stores/seed1-ab": 45.0}))  # the next seed, cut
    run_dir.mkdir(parents=True)
    rates = [5000.0, 5400.0, 5600.0]
    rows = [{"epoch": e, "images_per_s": rates[e % 3], "val_top1": None} for e in range(1, epochs_done + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if landed:
        (run_dir / "student.eval.json").write_text(json.dumps({"top1": 70.4321, "top5": 97.0}))


def test_a_landed_run_gives_every_figure_from_this_machine_only(tmp_path):
    out, run_dir = tmp_path / "out", tmp_path / "results" / "runs" / "both-v300-s0"
    _check_output(out, run_dir, 300, landed=True)
    record = summarise(out, run_dir, "both-v300-s0")
    assert record["gpu"] == "NVIDIA H200" and record["torch"] == "2.11.0+cu130"
    assert (record["cuda_tests_passed"], record["cuda_tests_failed"], record["cuda_tests_skipped"]) == (17, 3, 1)
    assert record["store_views"] == 1_500_000 and record["store_views_s"] == 9433.5
    assert record["train_img_s"] == 5400.0  # the median epoch, not the mean or the last
    assert record["store_min"] == 2.67  # 160 s added here; the 3,806.5 s committed from the CPU left out
    assert record["run_300_min"] == round((160.0 + 300.0) / 60, 2)
    assert record["epochs_reached"] == 300 and record["top1"] == 70.43


def test_a_run_cut_by_the_time_limit_is_reported_as_cut_not_estimated(tmp_path):
    out, run_dir = tmp_path / "out", tmp_path / "study-out" / "runs" / "both-v300-s0"
    _check_output(out, run_dir, 120, landed=False)
    record = summarise(out, run_dir, "both-v300-s0")
    assert record["epochs_reached"] == 120
    assert record["run_300_min"] is None and record["top1"] is None
    assert record["train_img_s"] == 5400.0  # the epochs that ran are still measured


def test_parsers_take_the_last_summary_and_finished_build():
    assert pytest_counts("") == {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    assert pytest_counts("20 passed in 12.0s\n")["passed"] == 20
    assert store_rate("precompute: 10 of 20 views, 5 views/s\n") == (None, None)


def test_no_gpu_name_when_nvidia_smi_printed_nothing(tmp_path):
    out, run_dir = tmp_path / "out", tmp_path / "runs" / "r-s0"
    _check_output(out, run_dir, 1, landed=False)
    (out / "gpu.txt").write_text("torch 2.14.1+cu130 timm 1.0.31\n")  # a machine without nvidia-smi
    record = summarise(out, run_dir, "r-s0")
    assert record["gpu"] is None and record["torch"] == "2.14.1+cu130"


def test_the_command_line_writes_gpu_json_from_the_study_out_folder_when_the_run_has_not_landed(tmp_path):
    out = tmp_path / "out"
    _check_output(out, tmp_path / "study-out" / "runs" / "both-v300-s0", 40, landed=False)
    target = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_summary.py"), "--out-dir", str(out),
                    "--results", str(tmp_path / "results"), "--study-out", str(tmp_path / "study-out"),
                    "--json", str(target)], check=True, capture_output=True)
    record = json.loads(target.read_text())
    assert record["epochs_reached"] == 40 and record["cuda_tests_failed"] == 3
    assert set(record) >= {"gpu", "torch", "cuda_tests_passed", "cuda_tests_failed", "train_img_s", "store_views_s",
                           "run_300_min", "top1"}
