"""Deployment: a checkpoint leaves libkd as a self-describing ONNX folder, fp32 and int8.

``libkd export`` writes ``model.onnx`` (torch's dynamo exporter; one output, the logits exactly
as the model combines its heads at inference; dynamic batch, fixed image size), optionally
``model.int8.onnx`` (onnxruntime quantisation), ``preprocess.json`` (everything inference needs)
and ``MODEL_CARD.md``, after checking onnxruntime against PyTorch on the checkpoint's own
validation images. ``libkd compare`` measures a student against the teachers it replaces, in one
run on one machine. :class:`OnnxModel` and :func:`load_model_for_inference` serve ``predict``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from libkd import LibkdError, __version__
from libkd.config import DataConfig
from libkd.fileio import read_json_with_format, write_json_atomic

FP32_FILE, INT8_FILE, PREPROCESS_FILE, CARD_FILE, EXPORT_FILE = (
    "model.onnx", "model.int8.onnx", "preprocess.json", "MODEL_CARD.md", "export.json")
PREPROCESS_FORMAT = "libkd-preprocess/1"
DEFAULT_OPSET, MIN_OPSET = 18, 18
# ONNX vs PyTorch: the largest |logit difference| allowed, relative to max(1, the largest |logit|).
# fp32 kernels differ in summation order only, which costs ~1e-6 here; 1e-3 catches any real bug.
TOLERANCE = 1e-3
# Static int8 quantises only the matrix products (and convolutions); LayerNorm, Softmax, GELU and the
# residual Adds stay fp32, as they are the nodes known to break ViTs under int8.
STATIC_OPS = ("MatMul", "Gemm", "Conv")
DYNAMIC_OPS = ("MatMul", "Gemm")  # onnxruntime's documented choice for transformers
INT8_MODES = ("dynamic", "static")


class ExportError(LibkdError):
    """An export that cannot be made, or a model folder that cannot be used."""


def _require_onnx() -> None:
    """ONNX support is an extra: name the install line instead of failing on an import."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"{', '.join(missing)} not installed; install the deploy extra: pip install 'libkd[deploy]' "
                          "(make venv installs it)")


# --------------------------------------------------------------------------- threads and sessions


def pin_threads(threads: int | None) -> int:
    """Pin PyTorch's intra-op threads (default: the cores this process may use); returns the number."""
    n = threads if threads is not None else available_cores()
    if n < 1:
        raise ExportError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n


def restores_threads(fn):
    """Run ``fn`` and put PyTorch's thread count back as it was: pinning is for the measurement, not the caller."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ort_session(path: str | Path, threads: int):
    """An onnxruntime CPU session with ``threads`` intra-op threads and sequential execution."""
    _require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for unreadable or invalid files
        raise ExportError(f"onnxruntime cannot load '{path}' ({exc.__class__.__name__}: {str(exc)[:200]}); "
                          "re-export it with `libkd export`") from exc


class OnnxModel:
    """An ONNX classifier behind the same call as a PyTorch model: float images (B, 3, H, W) -> logits."""

    def __init__(self, path: str | Path, threads: int):
        self.path = Path(path)
        self.session = ort_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        array = images.numpy() if isinstance(images, torch.Tensor) else images
        return torch.from_numpy(self.session.run(None, {self.input_name: np.ascontiguousarray(array, np.float32)})[0])


# --------------------------------------------------------------------------- preprocessing


def preprocess_spec(meta: dict[str, Any]) -> dict[str, Any]:
    """What inference needs to turn an image file into the model's input, from a checkpoint's sidecar."""
    data = meta.get("data_config") or {}
    return {
        "format": PREPROCESS_FORMAT,
        "input_size": meta["input_size"],
        "crop_pct": meta.get("crop_pct", 1.0),
        "resize": "short side to floor(input_size / crop_pct), bilinear with antialias, then centre crop input_size x "
                  "input_size (timm's evaluation transform)",
        "load_size": data.get("load_size"),  # when set, images are first resized to load_size x load_size (bicubic)
        "interpolation": "bilinear",
        "mean": meta["mean"],
        "std": meta["std"],
        "channel_order": "RGB",
        "layout": "NCHW",
        "scale": "uint8 / 255, then (x - mean) / std",
        "classes": meta.get("dataset", {}).get("classes") or [str(i) for i in range(meta["arch"]["num_classes"])],
        "input_name": "image",
        "output_name": "logits",
    }


def read_preprocess(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / PREPROCESS_FILE
    if not path.is_file():
        raise ExportError(f"'{folder}' has no {PREPROCESS_FILE}; an export folder is what `libkd export CHECKPOINT --out "
                          f"{folder}` writes (model.onnx + {PREPROCESS_FILE}); re-export into it")
    return read_json_with_format(path, PREPROCESS_FORMAT, ExportError, "re-export the model with `libkd export`")


def image_transform(spec: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3, H, W) -> the model's normalised float input, exactly as ``evaluate`` prepares images."""
    from libkd.data.transforms import eval_transform

    return eval_transform(spec["input_size"], spec["crop_pct"], spec["mean"], spec["std"])


# --------------------------------------------------------------------------- data


def checkpoint_data(path: str | Path, meta: dict[str, Any], data: DataConfig | None = None) -> DataConfig:
    """The data section a checkpoint was trained on (``data`` overrides it)."""
    if data is not None:
        return data
    if "data_config" not in meta:
        raise LibkdError(f"checkpoint '{path}' does not record its data set; pass the data section (-c CONFIG or --set data.*)")
    return DataConfig.model_validate(meta["data_config"])


def validation_batches(data: DataConfig, spec: dict[str, Any], batch_size: int, limit: int | None = None):
    """(images, labels) batches of the validation split (the first ``limit`` images when given) and the classes."""
    from libkd.evaluate import val_loader

    loader, val = val_loader(data, spec, batch_size)
    if limit and limit < len(val):
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(loader.dataset, range(limit)), batch_size=batch_size)
    return loader, val.classes


def calibration_images(data: DataConfig, spec: dict[str, Any], count: int, seed: int = 0) -> np.ndarray:
    """``count`` training images, chosen by ``seed``, under the inference transform: static int8's calibration set."""
    from libkd.data import build_dataset

    train = build_dataset(data, "train", seed=seed)
    picks = np.random.default_rng(seed).permutation(len(train))[:count]
    transform = image_transform(spec)
    return torch.stack([transform(train[int(i)][0]) for i in picks]).numpy()


# --------------------------------------------------------------------------- export and int8


def export_onnx(model: nn.Module, input_size: int, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """``model``'s forward as ONNX (dynamo exporter): input 'image' (batch, 3, S, S), output 'logits'."""
    _require_onnx()
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset {opset} is not supported: torch's ONNX exporter writes opsets {MIN_OPSET} to {newest} "
                          f"(onnx {onnx.__version__}); pass --opset between them (default {DEFAULT_OPSET})")
    example = torch.zeros(2, 3, input_size, input_size)
    import warnings

    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: "batch"},), opset_version=opset, verbose=False)
    tmp = path.with_name(path.name + ".tmp")
    program.save(str(tmp))
    os.replace(tmp, path)


class _quiet:
    """Silence the exporter's progress lines on stdout (ours come from libkd)."""

    def __enter__(self):
        self._stdout, sys.stdout = sys.stdout, open(os.devnull, "w")

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self._stdout


def quantize_int8(fp32: Path, out: Path, mode: str, calibration: np.ndarray | None = None) -> dict[str, Any]:
    """Write an int8 copy of ``fp32``: 'dynamic' (weights int8, activations quantised at run time, MatMul/Gemm) or
    'static' (QDQ, activation ranges calibrated on ``calibration``; MatMul/Gemm/Conv). Returns what was quantised."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in INT8_MODES:
        raise ExportError(f"int8 mode '{mode}' is not one of {', '.join(INT8_MODES)}")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        target = out.with_name(out.name + ".tmp")
        keep = activation_matmuls(prepared)
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(target), op_types_to_quantize=list(DYNAMIC_OPS), weight_type=QuantType.QInt8,
                             per_channel=False, nodes_to_exclude=keep)
            ops = DYNAMIC_OPS
        else:
            if calibration is None or not len(calibration):
                raise ExportError("static int8 needs calibration images (--calibration N, N > 0)")

            class Reader(CalibrationDataReader):
                def __init__(self, images: np.ndarray, batch: int = 32):
                    self.batches = iter([images[i:i + batch] for i in range(0, len(images), batch)])

                def get_next(self):
                    batch = next(self.batches, None)
                    return None if batch is None else {"image": batch}

            quantize_static(str(prepared), str(target), Reader(calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(STATIC_OPS), activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=keep)
            ops = STATIC_OPS
        os.replace(target, out)
    return {"mode": mode, "quantized_ops": list(ops),
            "kept_fp32": f"every other node (LayerNorm, Softmax, GELU, Add, ...) and the {len(keep)} attention MatMuls "
                         "between two activations (q.k and attention.v)",
            "calibration_images": int(len(calibration)) if mode == "static" and calibration is not None else 0}


def activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes with no constant input (attention's q.k and attention.v): int8 on both sides costs ViTs the most
    accuracy and saves no weight bytes, so they stay fp32."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)]


# --------------------------------------------------------------------------- measuring


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100.0 * (a.argmax(-1) == b.argmax(-1)).float().mean().item()


@torch.inference_mode()
def run_over(models: dict[str, Callable[[torch.Tensor], torch.Tensor]], batches: Iterable, desc: str = "scoring"
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every model's logits over the same batches (one pass over the images), and the labels."""
    from tqdm import tqdm

    out: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    labels = []
    for images, y in tqdm(batches, desc=desc, unit="batch", leave=False, disable=None):
        for name, model in models.items():
            out[name].append(model(images).float())
        labels.append(y)
    return {name: torch.cat(v) for name, v in out.items()}, torch.cat(labels)


@torch.inference_mode()
def latency_ms(model: Callable[[torch.Tensor], torch.Tensor], input_size: int, batch: int = 1, repeats: int = 50,
               warmup: int = 5) -> float:
    """Median wall time of one call on a batch of ``batch`` images, in milliseconds."""
    x = torch.randn(batch, 3, input_size, input_size)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def machine() -> dict[str, Any]:
    """The CPU and library versions a timing was measured with."""
    import onnxruntime as ort

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores_available": available_cores(),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "libkd": __version__}


def _mb(path: Path) -> float:
    return os.path.getsize(path) / 1e6


# --------------------------------------------------------------------------- libkd export


@restores_threads
def export_checkpoint(checkpoint: str, out: str | Path | None = None, int8: str | None = None, opset: int = DEFAULT_OPSET,
                      calibration: int = 256, data: DataConfig | None = None, val_images: int | None = None,
                      threads: int | None = None, batch_size: int = 256, command: str | None = None) -> dict[str, Any]:
    """Export a student or teacher checkpoint into ``out`` (default: CHECKPOINT.export/), validated and described."""
    from libkd.models import build_from_checkpoint, count_parameters

    threads = pin_threads(threads)
    model, meta = build_from_checkpoint(checkpoint)
    model.eval()
    folder = Path(out) if out else Path(f"{checkpoint}.export")
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"--out '{folder}' is a file; name a folder for the export")
    folder.mkdir(parents=True, exist_ok=True)
    spec = preprocess_spec(meta)
    data = checkpoint_data(checkpoint, meta, data)
    print(f"export: {meta['arch']['name']} ({count_parameters(model) / 1e6:.2f}M parameters) -> {folder / FP32_FILE}", flush=True)
    export_onnx(model, spec["input_size"], folder / FP32_FILE, opset)
    models: dict[str, Callable] = {"pytorch": model, "onnx": OnnxModel(folder / FP32_FILE, threads)}
    quant: dict[str, Any] | None = None
    if int8:
        calib = calibration_images(data, spec, calibration) if int8 == "static" else None
        print(f"export: int8 ({int8}) -> {folder / INT8_FILE}", flush=True)
        quant = quantize_int8(folder / FP32_FILE, folder / INT8_FILE, int8, calib)
        models["int8"] = OnnxModel(folder / INT8_FILE, threads)
    elif (folder / INT8_FILE).exists():
        (folder / INT8_FILE).unlink()  # an int8 file from an earlier export would describe other weights
    batches, classes = validation_batches(data, spec, batch_size, val_images)
    if classes != spec["classes"]:
        raise ExportError(f"the validation split's classes ({', '.join(classes[:4])}, ...) are not the checkpoint's "
                          f"({', '.join(spec['classes'][:4])}, ...); point --set data.* at the data it was trained on")
    logits, labels = run_over(models, batches, "validating")
    ref = logits["pytorch"]
    diff = (logits["onnx"] - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    validation = {
        "images": len(labels), "max_abs_logit_diff": diff, "tolerance": TOLERANCE * scale,
        "top1_agreement_onnx_vs_pytorch": top1_agreement(logits["onnx"], ref),
        "top1_pytorch": _top1(ref, labels), "top1_onnx": _top1(logits["onnx"], labels),
    }
    if quant:
        validation.update({"top1_int8": _top1(logits["int8"], labels),
                           "top1_agreement_int8_vs_fp32": top1_agreement(logits["int8"], logits["onnx"])})
    if diff > TOLERANCE * scale:
        raise ExportError(f"onnxruntime's logits differ from PyTorch's by up to {diff:.3g} on {len(labels)} validation images "
                          f"(tolerance {TOLERANCE * scale:.3g}); the export is wrong: report it with the model name "
                          f"'{meta['arch']['name']}' and opset {opset}")
    files = {FP32_FILE: _mb(folder / FP32_FILE), **({INT8_FILE: _mb(folder / INT8_FILE)} if quant else {})}
    latency = {name: latency_ms(m, spec["input_size"]) for name, m in models.items()}
    record = {
        "format": "libkd-export/1", "checkpoint": str(checkpoint), "weights_sha256": meta["weights_sha256"],
        "arch": meta["arch"], "parameters": count_parameters(model), "opset": opset, "int8": quant, "files_mb": files,
        "validation": validation, "latency_batch1_ms": latency, "threads": threads, "machine": machine(),
        "command": command or f"libkd export {checkpoint}",
    }
    write_json_atomic(folder / PREPROCESS_FILE, {**spec, "head_mode": meta["arch"].get("kwargs", {}).get("head_mode"),
                                                  "files": {"fp32": FP32_FILE, **({"int8": INT8_FILE} if quant else {})}})
    write_json_atomic(folder / EXPORT_FILE, record)
    (folder / CARD_FILE).write_text(model_card(checkpoint, meta, record, spec))
    return {**record, "folder": str(folder)}


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


def model_card(checkpoint: str, meta: dict[str, Any], record: dict[str, Any], spec: dict[str, Any]) -> str:
    """MODEL_CARD.md in the style of timm / Hugging Face cards, from the sidecar and the export's measurements."""
    from libkd.models import read_meta

    arch, v = meta["arch"], record["validation"]
    distill = meta.get("distill") or {}
    data = meta.get("data_config") or {}
    lines = [f"# {arch['name']} ({'student' if 'distill' in meta else 'teacher'}), exported by libkd {__version__}", "",
             "An image classifier exported from a libkd checkpoint. `model.onnx` takes float images (batch, 3, "
             f"{spec['input_size']}, {spec['input_size']}) named `image` and returns `logits` (batch, {arch['num_classes']}); "
             "`preprocess.json` says how to make the input. `libkd predict` does it for you:", "",
             "```bash", f"libkd predict {Path(record.get('folder', '.')).name or '.'} IMAGE_OR_FOLDER --top-k 5", "```", "",
             "## Model", "",
             f"- Architecture: `{arch['name']}` {json.dumps(arch.get('kwargs', {}))}"
             + (", CIFAR stem" if arch.get("cifar_stem") else ""),
             f"- Parameters: {record['parameters']:,} ({record['parameters'] / 1e6:.2f}M)",
             f"- Input: {spec['input_size']} x {spec['input_size']} RGB, crop_pct {spec['crop_pct']}, mean {spec['mean']}, "
             f"std {spec['std']}",
             f"- Classes ({len(spec['classes'])}): {', '.join(spec['classes'][:20])}{' ...' if len(spec['classes']) > 20 else ''}"]
    if distill:
        head_mode = arch.get("kwargs", {}).get("head_mode", "mean")
        lines += [f"- Distillation: mode `{distill.get('mode')}`, {distill.get('tokens', 0)} teacher token(s) "
                  f"({distill.get('combine')}); the exported output combines the heads as `head_mode={head_mode}`"]
        for i, path in enumerate(distill.get("teacher_checkpoints") or []):
            try:
                t_meta = read_meta(path)
                acc = f"{t_meta.get('metrics', {}).get('val_top1', float('nan')):.2f} % val top-1"
            except LibkdError:
                acc = "checkpoint not found here"
            kind = (distill.get("teacher_kinds") or ["?"] * (i + 1))[i]
            name = (distill.get("teachers") or ["?"] * (i + 1))[i]
            lines.append(f"  - teacher {i}: `{name}` ({kind}), `{path}`: {acc}")
        store = distill.get("store") or {}
        if store:
            lines.append(f"  - store `{store.get('path')}`, {distill.get('views')} views per image")
    lines += ["", "## Data", "",
              f"- Source: {meta.get('dataset', {}).get('source')} {data.get('root') or ''} (subset {data.get('subset')}), "
              f"fingerprint `{meta.get('dataset', {}).get('fingerprint', '?')[:16]}`",
              f"- Trained for {meta.get('metrics', {}).get('epoch', '?')} epochs; the recipe is `config.yaml` beside the "
              f"checkpoint (`{Path(checkpoint).parent / 'config.yaml'}`)", "",
              f"## Validation ({v['images']} images of the validation split)", "",
              "| model | top-1 | agreement with fp32 | file | batch-1 latency |", "|---|---|---|---|---|",
              f"| PyTorch fp32 | {v['top1_pytorch']:.2f} | | | {record['latency_batch1_ms']['pytorch']:.2f} ms |",
              f"| ONNX fp32 | {v['top1_onnx']:.2f} | {v['top1_agreement_onnx_vs_pytorch']:.2f} % (max logit diff "
              f"{v['max_abs_logit_diff']:.2g}) | {record['files_mb'][FP32_FILE]:.2f} MB | {record['latency_batch1_ms']['onnx']:.2f} ms |"]
    if record["int8"]:
        q = record["int8"]
        lines.append(f"| ONNX int8 ({q['mode']}) | {v['top1_int8']:.2f} | {v['top1_agreement_int8_vs_fp32']:.2f} % | "
                     f"{record['files_mb'][INT8_FILE]:.2f} MB | {record['latency_batch1_ms']['int8']:.2f} ms |")
        lines += ["", f"int8 ({q['mode']}) quantises {', '.join(q['quantized_ops'])}; {q['kept_fp32']} stays fp32"
                      + (f"; activation ranges calibrated on {q['calibration_images']} training images." if q["mode"] == "static" else ".")]
    m = record["machine"]
    lines += ["", f"Latency: median of 50 calls, {record['threads']} thread(s), {m['cpu']}, torch {m['torch']}, "
                  f"onnxruntime {m['onnxruntime']}.", "",
              "## How it was made", "", "```bash",
              f"libkd distill -c {Path(checkpoint).parent / 'config.yaml'}   # the checkpoint" if distill else
              f"libkd train-teacher -c {Path(checkpoint).parent / 'config.yaml'}   # the checkpoint",
              record["command"], "```", "",
              f"Weights sha256 `{meta['weights_sha256']}`; opset {record['opset']}.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- loading for predict


def load_model_for_inference(path: str, threads: int | None = None, int8: bool = False
                             ) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any], str]:
    """(model, preprocess spec, description) for a checkpoint (PyTorch) or an export folder (onnxruntime)."""
    from libkd.models import build_from_checkpoint
    from libkd.models.checkpoint import checkpoint_paths

    threads = pin_threads(threads)
    p = Path(path)
    if p.is_dir():
        spec = read_preprocess(p)
        name = spec["files"].get("int8" if int8 else "fp32")
        if name is None:
            raise ExportError(f"'{path}' holds no int8 model; re-export with --int8 dynamic|static, or drop --int8")
        if not (p / name).is_file():
            raise ExportError(f"'{p / name}' is missing from the export folder; re-export with `libkd export`")
        return OnnxModel(p / name, threads), spec, f"onnxruntime {p / name}"
    weights, sidecar = checkpoint_paths(path)
    if not weights.is_file() and not sidecar.is_file():
        raise ExportError(f"'{path}' is neither an export folder (with {PREPROCESS_FILE}) nor a checkpoint "
                          "(NAME.safetensors + NAME.json); pass one of them")
    if int8:
        raise ExportError("--int8 needs an export folder; export the checkpoint first: libkd export CHECKPOINT --int8 dynamic")
    model, meta = build_from_checkpoint(path)
    return model.eval(), preprocess_spec(meta), f"PyTorch {weights}"


def describe_command(argv: list[str] | None = None) -> str:
    return "libkd " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


# --------------------------------------------------------------------------- libkd compare


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
    lines = [f"# Student vs teachers: what deployment costs", "",
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
