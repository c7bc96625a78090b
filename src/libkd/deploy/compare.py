"""``libkd compare``: what a student saves against the teachers it replaces, measured in one run on one machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from libkd.config import DataConfig
from libkd.deploy.export import DEFAULT_OPSET, check_against_pytorch, check_classes, describe_command, export_onnx, optimize_onnx
from libkd.deploy.measure import size_mb, top1_percent, latency_ms, machine, run_over, top1_agreement, validation_batches
from libkd.deploy.quantize import INT8_MODES, INT8_RECIPES, calibration_images, quantize_int8
from libkd.deploy.runtime import FP32_FILE, ExportError, OnnxModel, pin_threads, preprocess_spec, restores_threads
from libkd.fileio import write_json_atomic
from libkd.models.checkpoint import checkpoint_data


# fp32 graphs of the student besides the plain export: `--fp32 NAME` in compare, each a row.
FP32_VARIANTS = {
    "opset23": {"opset": 23, "optimize": False},           # attention exported as ONNX's Attention op
    "optimized": {"opset": None, "optimize": True},        # onnxruntime's transformer optimizer on the plain export
    "opset23-optimized": {"opset": 23, "optimize": True},
}


@restores_threads
def compare(student: str, teachers: list[str] | None = None, out: str | Path = "runs/compare", threads: int | None = None,
            repeats: int = 50, val_images: int | None = None, int8: tuple[str, ...] = INT8_MODES, calibration: int = 256,
            batch_size: int = 256, data: DataConfig | None = None, opset: int = DEFAULT_OPSET, command: str | None = None,
            fp32: tuple[str, ...] = ()) -> Path:
    """What the student saves against the teachers it replaces, measured in one run on one machine: parameters, file
    size, batch-1 latency, batch-64 throughput and top-1 on the validation split. Writes compare.md/.json/.png.

    The student runs in eager PyTorch, onnxruntime fp32 (the plain export, and each of ``fp32``'s variants) and each
    int8 recipe of ``int8`` (``NAME`` quantises the plain export, ``NAME@VARIANT`` that fp32 variant: quantising after
    fusion); each teacher in eager PyTorch and in onnxruntime. Every onnxruntime fp32 graph is checked against PyTorch
    as ``libkd export`` checks it, and the validation split's classes against the checkpoint's. The ensemble row takes
    each teacher at its faster runtime."""
    from libkd.models import FlipAverage, build_from_checkpoint, count_parameters
    from libkd.models.checkpoint import checkpoint_paths

    threads, out = pin_threads(threads), Path(out)
    (out / "exports").mkdir(parents=True, exist_ok=True)
    _check_variants(fp32, int8)
    model, meta = build_from_checkpoint(student)
    model.eval()
    spec = preprocess_spec(meta)
    data = checkpoint_data(student, meta, data)
    batches, classes = validation_batches(data, spec, batch_size, val_images)
    check_classes(classes, spec, f"the student '{student}'")
    teacher_paths, loaded = _teachers_of(meta, teachers, spec["classes"])

    rows: list[dict[str, Any]] = []
    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    checks: dict[str, str] = {}  # onnxruntime row -> the PyTorch row it must match
    size = spec["input_size"]

    def add(name: str, kind: str, runner: Callable, params: int, file: Path | None, input_size: int, **extra: Any) -> None:
        runners[name] = runner
        rows.append({"model": name, "kind": kind, "parameters": params, "file_mb": size_mb(file) if file else None,
                     "input_size": input_size, **extra})

    n_params = count_parameters(model)
    eager = "student fp32 (PyTorch eager)"
    add(eager, "student", model, n_params, checkpoint_paths(student)[0], size)
    graphs = {"": out / "exports" / "student" / FP32_FILE}
    graphs[""].parent.mkdir(parents=True, exist_ok=True)
    print(f"compare: exporting the student -> {graphs['']}", flush=True)
    export_onnx(model, size, graphs[""], opset)
    add("student fp32 (onnxruntime)", "student", OnnxModel(graphs[""], threads), n_params, graphs[""], size, variant="plain")
    checks["student fp32 (onnxruntime)"] = eager
    for variant in fp32:
        settings = FP32_VARIANTS[variant]
        path = graphs[""].with_name(f"model.{variant}.onnx")
        export_onnx(model, size, path, settings["opset"] or opset)
        fused = optimize_onnx(path, path, model) if settings["optimize"] else None
        graphs[variant] = path
        name = f"student fp32 {variant} (onnxruntime)"
        add(name, "student", OnnxModel(path, threads), n_params, path, size, variant=variant, fused=fused)
        checks[name] = eager
    for entry in int8:
        mode, _, variant = entry.partition("@")
        path = graphs[""].with_name(f"model.int8-{mode}{f'-{variant}' if variant else ''}.onnx")
        print(f"compare: int8 ({entry}) -> {path}", flush=True)
        calib = calibration_images(data, spec, calibration) if INT8_RECIPES[mode].mode == "static" else None
        quant = quantize_int8(graphs[variant], path, mode, calib)
        add(f"student int8 {entry} (onnxruntime)", "int8", OnnxModel(path, threads), n_params, path, size,
            variant=variant or "plain", recipe=quant["recipe"])
    for i, teacher in enumerate(loaded):
        t_size = teacher.meta.get("input_size", size)
        path = out / "exports" / f"teacher{i}" / FP32_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        arch = teacher.meta["arch"]["name"] + (" flip-averaged" if isinstance(teacher.model, FlipAverage) else "")
        print(f"compare: exporting teacher {i} ({arch}) -> {path}", flush=True)
        export_onnx(teacher.model, t_size, path, opset)
        session = OnnxModel(path, threads)
        params = count_parameters(teacher.model)

        def prepared(run: Callable, t=teacher, ts=t_size) -> Callable:
            return lambda x: run(t.prepare(x, spec["mean"], spec["std"], ts))

        weights = checkpoint_paths(teacher.path)[0]
        add(f"teacher {i}: {arch} (PyTorch eager)", "teacher", prepared(teacher.model), params, weights, t_size,
            teacher=i, direct=teacher.model)
        add(f"teacher {i}: {arch} (onnxruntime)", "teacher", prepared(session), params, path, t_size, teacher=i, direct=session)
        checks[f"teacher {i}: {arch} (onnxruntime)"] = f"teacher {i}: {arch} (PyTorch eager)"
    logits, labels = run_over(runners, batches, "scoring")
    for name, reference in checks.items():  # onnxruntime against PyTorch, as libkd export checks it
        diff = check_against_pytorch(logits[name], logits[reference], name, opset)["max_abs_logit_diff"]
        next(r for r in rows if r["model"] == name)["max_abs_logit_diff_vs_pytorch"] = diff
    fp32_logits = logits[eager]
    for row in rows:
        row["top1"] = top1_percent(logits[row["model"]], labels)
        row["agreement_with_student_fp32"] = top1_agreement(logits[row["model"]], fp32_logits) if row["kind"] != "teacher" else None
    _time(rows, runners, threads, repeats)
    ensemble = _ensemble_row(rows, logits, labels, size)
    if ensemble:
        rows.append(ensemble)
    record = {"student": student, "teachers": teacher_paths, "images": len(labels), "threads": threads, "repeats": repeats,
              "machine": machine(), "rows": rows, "command": command or describe_command()}
    write_json_atomic(out / "compare.json", record)
    (out / "compare.md").write_text(compare_markdown(record))
    compare_plot(rows, out / "compare.png")
    return out / "compare.md"


def _teachers_of(meta: dict[str, Any], given: list[str] | None, classes: list[str]) -> tuple[list[str], list]:
    """The teachers a student is compared with (those given, else those it learned from), run as it learned from them:
    flip-averaged where its store was."""
    from libkd.teachers import load_teachers

    distill = meta.get("distill") or {}
    paths = given if given is not None else list(distill.get("teacher_checkpoints") or [])
    return paths, load_teachers(paths, classes, torch.device("cpu"), flip=bool(distill.get("teacher_flip"))) if paths else []


def _check_variants(fp32: tuple[str, ...], int8: tuple[str, ...]) -> None:
    unknown = [v for v in fp32 if v not in FP32_VARIANTS] + [m for m in int8 if m.partition("@")[0] not in INT8_RECIPES
                                                             or m.partition("@")[2] not in ("", *fp32)]
    if unknown:
        raise ExportError(f"unknown variant(s) {unknown}: fp32 variants are {', '.join(FP32_VARIANTS)}, int8 recipes "
                          f"{', '.join(INT8_RECIPES)}, optionally @ one of the fp32 variants asked for")


def _time(rows: list[dict[str, Any]], runners: dict[str, Callable], threads: int, repeats: int) -> None:
    """Each row's batch-1 latency (median of ``repeats``) and batch-64 throughput, on its own input size."""
    print(f"compare: timing {len(rows)} models ({threads} thread(s), batch 1 median of {repeats}, batch 64)", flush=True)
    with torch.inference_mode():
        for row in rows:
            call = row.pop("direct", None) or runners[row["model"]]  # a teacher is timed on its own input
            row["latency_b1_ms"] = latency_ms(call, row["input_size"], 1, repeats)
            row["throughput_b64"] = 64 * 1000.0 / latency_ms(call, row["input_size"], 64, max(5, repeats // 5), warmup=2)


def _ensemble_row(rows: list[dict[str, Any]], logits: dict[str, torch.Tensor], labels: torch.Tensor, size: int
                  ) -> dict[str, Any] | None:
    """The teachers' ensemble (mean probabilities), each teacher at its faster runtime; None with fewer than two."""
    best: dict[int, dict[str, Any]] = {}
    for row in rows:  # each teacher at its faster runtime (batch-64 throughput)
        if row["kind"] == "teacher" and (row["teacher"] not in best or row["throughput_b64"] > best[row["teacher"]]["throughput_b64"]):
            best[row["teacher"]] = row
    if len(best) < 2:
        return None
    chosen = [best[i] for i in sorted(best)]
    probs = torch.stack([logits[r["model"]].softmax(-1) for r in chosen]).mean(0)
    return {"model": f"teacher ensemble ({len(chosen)}, mean probabilities; each at its faster runtime)",
            "kind": "ensemble", "parameters": sum(r["parameters"] for r in chosen),
            "file_mb": sum(r["file_mb"] for r in chosen), "input_size": size, "members": [r["model"] for r in chosen],
            "top1": top1_percent(probs, labels), "agreement_with_student_fp32": None,
            "latency_b1_ms": sum(r["latency_b1_ms"] for r in chosen),
            "throughput_b64": 1.0 / sum(1.0 / r["throughput_b64"] for r in chosen)}


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
    eager = by_name.get("student fp32 (PyTorch eager)")
    ort = [r for r in record["rows"] if r["kind"] == "student" and r.get("variant")]
    ort32 = max(ort, key=lambda r: r["throughput_b64"]) if ort else None  # the fastest onnxruntime fp32 graph
    int8 = [r for r in record["rows"] if r["kind"] == "int8"]
    lines += [""]
    for r in ort:
        if r.get("fused") is not None:
            lines.append(f"- `{r['variant']}`: onnxruntime's transformer optimizer fused "
                         + (", ".join(f"{k} x{v}" for k, v in r["fused"].items()) or "nothing")
                         + ("; Attention did not fuse" if not r["fused"].get("Attention") else "") + ".")
    for r in int8:
        lines.append(f"- `{r['model']}`: {r.get('recipe', '')}.")
    if eager and ort32:
        lines += ["", f"Fastest onnxruntime fp32 ({ort32['model']}): {ort32['throughput_b64'] / eager['throughput_b64']:.2f}x "
                      f"eager PyTorch's batch-64 throughput, {ort32['latency_b1_ms'] / eager['latency_b1_ms']:.2f}x its "
                      "batch-1 latency."]
    if ort32 and int8:
        best = max(int8, key=lambda r: r["top1"])
        lines.append(f"Most accurate int8 ({best['model']}): {best['throughput_b64'] / ort32['throughput_b64']:.2f}x that fp32 graph's "
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
