"""``libkd compare``: what a student saves against the teachers it replaces, measured in one run on one machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from libkd.config import DataConfig
from libkd.deploy.export import DEFAULT_OPSET, describe_command, export_onnx
from libkd.deploy.measure import _mb, _top1, latency_ms, machine, run_over, top1_agreement, validation_batches
from libkd.deploy.quantize import INT8_MODES, calibration_images, quantize_int8
from libkd.deploy.runtime import FP32_FILE, OnnxModel, pin_threads, preprocess_spec, restores_threads
from libkd.fileio import write_json_atomic
from libkd.models.checkpoint import checkpoint_data



@restores_threads
def compare(student: str, teachers: list[str] | None = None, out: str | Path = "runs/compare", threads: int | None = None,
            repeats: int = 50, val_images: int | None = None, int8: tuple[str, ...] = INT8_MODES, calibration: int = 256,
            batch_size: int = 256, data: DataConfig | None = None, opset: int = DEFAULT_OPSET, command: str | None = None) -> Path:
    """What the student saves against the teachers it replaces, measured in one run on one machine: parameters, file
    size, batch-1 latency, batch-64 throughput and top-1 on the validation split. Writes compare.md/.json/.png."""
    from libkd.models import build_from_checkpoint, count_parameters
    from libkd.models.checkpoint import checkpoint_paths
    from libkd.teachers import load_teachers

    threads = pin_threads(threads)
    out = Path(out)
    (out / "exports").mkdir(parents=True, exist_ok=True)
    model, meta = build_from_checkpoint(student)
    model.eval()
    spec = preprocess_spec(meta)
    data = checkpoint_data(student, meta, data)
    teacher_paths = teachers if teachers is not None else list((meta.get("distill") or {}).get("teacher_checkpoints") or [])
    loaded = load_teachers(teacher_paths, spec["classes"], torch.device("cpu")) if teacher_paths else []

    rows: list[dict[str, Any]] = []
    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    student_onnx = out / "exports" / "student" / FP32_FILE
    student_onnx.parent.mkdir(parents=True, exist_ok=True)
    print(f"compare: exporting the student -> {student_onnx}", flush=True)
    export_onnx(model, spec["input_size"], student_onnx, opset)
    size = spec["input_size"]

    def add(name: str, kind: str, runner: Callable, params: int, file: Path | None, input_size: int) -> None:
        runners[name] = runner
        rows.append({"model": name, "kind": kind, "parameters": params, "file_mb": _mb(file) if file else None,
                     "input_size": input_size})

    n_params = count_parameters(model)
    add("student fp32 (PyTorch eager)", "student", model, n_params, checkpoint_paths(student)[0], size)
    add("student fp32 (onnxruntime)", "student", OnnxModel(student_onnx, threads), n_params, student_onnx, size)
    for mode in int8:
        path = student_onnx.with_name(f"model.int8-{mode}.onnx")
        print(f"compare: int8 ({mode}) -> {path}", flush=True)
        calib = calibration_images(data, spec, calibration) if mode == "static" else None
        quantize_int8(student_onnx, path, mode, calib)
        add(f"student int8 {mode} (onnxruntime)", "int8", OnnxModel(path, threads), n_params, path, size)
    teacher_onnx = []
    for i, teacher in enumerate(loaded):
        t_size = teacher.meta.get("input_size", size)
        path = out / "exports" / f"teacher{i}" / FP32_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"compare: exporting teacher {i} ({teacher.meta['arch']['name']}) -> {path}", flush=True)
        export_onnx(teacher.model, t_size, path, opset)
        session = OnnxModel(path, threads)
        teacher_onnx.append(session)

        def run_teacher(x: torch.Tensor, t=teacher, s=session, ts=t_size) -> torch.Tensor:
            return s(t.prepare(x, spec["mean"], spec["std"], ts))

        name = f"teacher {i}: {teacher.meta['arch']['name']} (onnxruntime)"
        add(name, "teacher", run_teacher, count_parameters(teacher.model), path, t_size)
        rows[-1]["direct"] = session  # latency is timed on the teacher's own input, without re-normalising
    batches, classes = validation_batches(data, spec, batch_size, val_images)
    logits, labels = run_over(runners, batches, "scoring")
    fp32 = logits["student fp32 (PyTorch eager)"]
    for row in rows:
        row["top1"] = _top1(logits[row["model"]], labels)
        row["agreement_with_student_fp32"] = top1_agreement(logits[row["model"]], fp32) if row["kind"] != "teacher" else None
    print(f"compare: timing {len(rows)} models ({threads} thread(s), batch 1 median of {repeats}, batch 64)", flush=True)
    for row in rows:
        call = row.pop("direct", None) or runners[row["model"]]
        row["latency_b1_ms"] = latency_ms(call, row["input_size"], 1, repeats)
        row["throughput_b64"] = 64 * 1000.0 / latency_ms(call, row["input_size"], 64, max(5, repeats // 5), warmup=2)
    teacher_rows = [r for r in rows if r["kind"] == "teacher"]
    if len(teacher_rows) > 1:
        probs = torch.stack([logits[r["model"]].softmax(-1) for r in teacher_rows]).mean(0)
        rows.append({"model": f"teacher ensemble ({len(teacher_rows)}, mean probabilities)", "kind": "ensemble",
                     "parameters": sum(r["parameters"] for r in teacher_rows),
                     "file_mb": sum(r["file_mb"] for r in teacher_rows), "input_size": size,
                     "top1": _top1(probs, labels), "agreement_with_student_fp32": None,
                     "latency_b1_ms": sum(r["latency_b1_ms"] for r in teacher_rows),
                     "throughput_b64": 1.0 / sum(1.0 / r["throughput_b64"] for r in teacher_rows)})
    record = {"student": student, "teachers": teacher_paths, "images": len(labels), "threads": threads, "repeats": repeats,
              "machine": machine(), "rows": rows, "command": command or describe_command()}
    write_json_atomic(out / "compare.json", record)
    (out / "compare.md").write_text(compare_markdown(record))
    compare_plot(rows, out / "compare.png")
    return out / "compare.md"



def compare_markdown(record: dict[str, Any]) -> str:
    m = record["machine"]
    lines = ["# Student vs teachers: what deployment costs", "",
             f"{record['images']} validation images; {m['cpu']}, {record['threads']} thread(s) (pinned for PyTorch and "
             f"onnxruntime), torch {m['torch']}, onnxruntime {m['onnxruntime']}. Batch-1 latency: median of "
             f"{record['repeats']} calls; batch-64 throughput: median call. All measured in one run.", "",
             "| model | parameters | file | batch-1 latency | batch-64 throughput | top-1 | top-1 agreement with student fp32 |",
             "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        agree = f"{r['agreement_with_student_fp32']:.2f} %" if r["agreement_with_student_fp32"] is not None else ""
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['file_mb']:.2f} MB | {r['latency_b1_ms']:.2f} ms | "
                     f"{r['throughput_b64']:.0f} img/s | {r['top1']:.2f} | {agree} |")
    rows = {r["kind"]: r for r in record["rows"]}
    by_name = {r["model"]: r for r in record["rows"]}
    ort32 = by_name.get("student fp32 (onnxruntime)")
    int8 = [r for r in record["rows"] if r["kind"] == "int8"]
    lines += [""]
    if ort32 and int8:
        best = max(int8, key=lambda r: r["top1"])
        lines.append(f"Best int8 ({best['model']}): {best['throughput_b64'] / ort32['throughput_b64']:.2f}x the onnxruntime fp32 "
                     f"throughput at batch 64, file {best['file_mb'] / ort32['file_mb']:.2f}x, top-1 "
                     f"{best['top1'] - ort32['top1']:+.2f} points.")
    against = rows.get("ensemble") or next((r for r in record["rows"] if r["kind"] == "teacher"), None)
    if ort32 and against:
        lines.append(f"Student (onnxruntime fp32) against {against['model']}: parameters "
                     f"{ort32['parameters'] / against['parameters']:.2f}x, batch-1 latency "
                     f"{ort32['latency_b1_ms'] / against['latency_b1_ms']:.2f}x, batch-64 throughput "
                     f"{ort32['throughput_b64'] / against['throughput_b64']:.2f}x, top-1 {ort32['top1'] - against['top1']:+.2f} points.")
    lines += ["", f"Command: `{record['command']}`", ""]
    return "\n".join(lines)



def compare_plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"student": "o", "int8": "s", "teacher": "^", "ensemble": "D"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["latency_b1_ms"], r["top1"], marker=markers.get(r["kind"], "o"), s=60, label=r["model"])
    ax.set_xlabel("batch-1 latency (ms, median)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Top-1 against latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
