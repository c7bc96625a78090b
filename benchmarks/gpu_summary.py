"""docs/benchmarks/gpu.json from what benchmarks/gpu_check.sh leaves under $OUT: one record of the GPU path.

    python3 benchmarks/gpu_summary.py --out-dir $OUT --results docs/results/cifar10-10pct-strong --run both-v300-s0

Reads, each where the check wrote it:
- ``gpu.txt``: nvidia-smi's name line and the ``torch ...`` version line;
- ``cuda_tests.txt``: pytest's closing line (passed, failed, skipped, errors);
- ``study.log``: the store build's last progress line (``N of M views, R views/s``);
- ``timings_before.json`` / ``timings_after.json``: the study's timings.json around the call, so the
  store's and the run's wall time are this machine's own (timings.json sums every machine's time);
- the run's ``metrics.jsonl`` and ``student.eval.json``: in ``--results``/runs/RUN once it has landed, else in
  ``--study-out``/runs/RUN, where an unfinished run trains.

A figure the check did not reach (a run cut by the call's time limit) is written as null, with the
epochs reached, never guessed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)")
STORE_PROGRESS = re.compile(r"precompute: .*?([\d,]+) of ([\d,]+) views, ([\d,.]+) views/s")


def pytest_counts(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line (``2 failed, 18 passed in 30s``); all zero when there is none."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    lines = [line for line in text.splitlines() if PYTEST_COUNT.search(line)]
    for number, kind in PYTEST_COUNT.findall(lines[-1] if lines else ""):
        key = "errors" if kind.startswith("error") else kind
        if key in counts:
            counts[key] += int(number)
    return counts


def store_rate(log: str) -> tuple[int | None, float | None]:
    """(views built, views/s) from the last finished store build's progress line, or (None, None)."""
    done = [(int(a.replace(",", "")), int(b.replace(",", "")), float(r.replace(",", "")))
            for a, b, r in STORE_PROGRESS.findall(log)]
    finished = [(total, rate) for got, total, rate in done if got == total]
    return finished[-1] if finished else (None, None)


def machine_seconds(before: dict[str, float], after: dict[str, float], prefix: str) -> float:
    """Seconds this call added to the timings whose key starts with ``prefix``."""
    return sum(after[k] - before.get(k, 0.0) for k in after if k.startswith(prefix))


def run_seed(run: str) -> str:
    """The seed in a study run's folder name (``both-v300-s0`` -> ``0``): it names the store the run reads."""
    return run.rsplit("-s", 1)[1]


def summarise(out_dir: Path, run_dir: Path, run: str, epochs: int = 300) -> dict:
    """The gpu.json record; see the module docstring for where each figure comes from."""
    gpu_lines = (out_dir / "gpu.txt").read_text().splitlines() if (out_dir / "gpu.txt").is_file() else []
    torch_line = next((line for line in gpu_lines if line.startswith("torch ")), "")
    smi_line = next((line for line in gpu_lines if line.strip() and not line.startswith("torch ")), "")
    tests = pytest_counts((out_dir / "cuda_tests.txt").read_text() if (out_dir / "cuda_tests.txt").is_file() else "")
    log = (out_dir / "study.log").read_text() if (out_dir / "study.log").is_file() else ""
    views, views_s = store_rate(log)

    def timings(name: str) -> dict[str, float]:
        path = out_dir / name
        return json.loads(path.read_text()) if path.is_file() else {}

    before, after = timings("timings_before.json"), timings("timings_after.json")
    # only this seed's store: the next seed's build, which the time limit cuts, is not part of this run
    store_s = machine_seconds(before, after, f"store stores/seed{run_seed(run)}-")
    run_s = after.get(f"run {run}", 0.0) - before.get(f"run {run}", 0.0)
    rows = []
    if (run_dir / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    reached = max((row["epoch"] for row in rows), default=0)
    finished = reached >= epochs and (run_dir / "student.eval.json").is_file()
    top1 = json.loads((run_dir / "student.eval.json").read_text()).get("top1") if finished else None
    rates = [row["images_per_s"] for row in rows if row.get("images_per_s")]
    return {
        "gpu": smi_line.split(",")[0].strip() or None,  # None: nvidia-smi printed nothing (no GPU)
        "torch": torch_line.split()[1] if torch_line else None,
        "cuda_tests_passed": tests["passed"],
        "cuda_tests_failed": tests["failed"] + tests["errors"],
        "cuda_tests_skipped": tests["skipped"],
        "run": run,
        "epochs_reached": reached,
        "train_img_s": round(statistics.median(rates), 1) if rates else None,
        "store_views": views,
        "store_views_s": views_s,
        "store_min": round(store_s / 60, 2) if store_s else None,
        "run_300_min": round((store_s + run_s) / 60, 2) if finished else None,
        "top1": round(top1, 2) if top1 is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="the check's $OUT")
    parser.add_argument("--results", type=Path, required=True, help="the study's results folder")
    parser.add_argument("--study-out", type=Path, required=True, help="the study's out folder (runs/...)")
    parser.add_argument("--run", default="both-v300-s0", help="the 300-epoch run the check trained")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--json", type=Path, default=Path("docs/benchmarks/gpu.json"))
    args = parser.parse_args()
    run_dir = args.results / "runs" / args.run
    if not (run_dir / "metrics.jsonl").is_file():
        run_dir = args.study_out / "runs" / args.run
    record = summarise(args.out_dir, run_dir, args.run, args.epochs)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
