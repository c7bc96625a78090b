"""MODEL_CARD.md of an export: the model, its teachers, data, validation figures and the commands that made it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from libkd import LibkdError, __version__
from libkd.config import describe_data
from libkd.deploy.runtime import FP32_FILE, INT8_FILE


def front_matter(meta: dict[str, Any], record: dict[str, Any], spec: dict[str, Any]) -> str:
    """The Hugging Face model-card metadata (YAML between --- lines): library, tags, data set, the measured top-1 of
    the fp32 and int8 exports as model-index results, and the teachers the student learned from."""
    import yaml

    v, distill = record["validation"], meta.get("distill") or {}
    data = meta.get("data_config") or {}
    dataset = data.get("source") if data.get("source") != "imagefolder" else Path(str(data.get("root") or "images")).name
    results = [{"type": "accuracy", "name": "top-1, ONNX fp32", "value": round(v["top1_onnx"], 2)}]
    if record.get("int8"):
        results.append({"type": "accuracy", "name": f"top-1, ONNX int8 ({record['int8']['mode']})", "value": round(v["top1_int8"], 2)})
    card = {
        "library_name": "timm",
        "license": "apache-2.0",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "timm", "libkd", "onnx",
                 *(["knowledge-distillation", "vision-transformer"] if distill else [])],
        "datasets": [dataset],
        "metrics": ["accuracy"],
        "model-index": [{"name": meta["arch"]["name"], "results": [{
            "task": {"type": "image-classification"},
            "dataset": {"name": dataset, "type": dataset, "split": data.get("val_split") or "validation"},
            "metrics": results}]}],
    }
    if distill:
        card["base_teachers"] = [{"name": n, "kind": k, "checkpoint": str(p)} for n, k, p in
                                 zip(distill.get("teachers") or [], distill.get("teacher_kinds") or [],
                                     distill.get("teacher_checkpoints") or [])]
    return "---\n" + yaml.safe_dump(card, sort_keys=False, allow_unicode=True) + "---\n"


def model_card(checkpoint: str, meta: dict[str, Any], record: dict[str, Any], spec: dict[str, Any]) -> str:
    """MODEL_CARD.md in the style of timm / Hugging Face cards, from the sidecar and the export's measurements."""
    from libkd.models import read_meta

    arch, v = meta["arch"], record["validation"]
    distill = meta.get("distill") or {}
    data = meta.get("data_config") or {}
    role = "student" if "distill" in meta else "teacher"
    lines = [front_matter(meta, record, spec), f"# {arch['name']} ({role}), exported by libkd {__version__}", "",
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
              f"- Source: {describe_data({**data, 'source': meta.get('dataset', {}).get('source')})}, "
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
                      + (f"; activation ranges calibrated on {q['calibration_images']} training images." if q["calibration_images"] else ".")]
    m = record["machine"]
    lines += ["", f"Latency: median of 50 calls, {record['threads']} thread(s), {m['cpu']}, torch {m['torch']}, "
                  f"onnxruntime {m['onnxruntime']}.", "",
              "## How it was made", "", "```bash",
              f"libkd distill -c {Path(checkpoint).parent / 'config.yaml'}   # the checkpoint" if distill else
              f"libkd train-teacher -c {Path(checkpoint).parent / 'config.yaml'}   # the checkpoint",
              record["command"], "```", "",
              f"Weights sha256 `{meta['weights_sha256']}`; opset {record['opset']}.", ""]
    return "\n".join(lines)
