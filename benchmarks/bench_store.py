"""Store benchmarks, measured side by side in one run:

1. precompute throughput against the same teachers' raw batched inference on pre-made tensors;
2. the cost of reading a training batch (128 records, every teacher) against one training step
   of the CIFAR student;
3. bytes per sample per view per teacher (fp16, top-k 5 and 10, at 10/100/1000 classes) and the
   top-k reconstruction error KL(full || decoded) at 1000 classes, at T = 1 and at the default
   stored temperatures (2, 3, 4), with the tails kept at T and with the T=1 tail spread then
   tempered (what stores without ``topk_taus`` give).

    .venv/bin/python benchmarks/bench_store.py \
        --teachers runs/cifar10-resnet-teacher/teacher runs/cifar10-rednet-teacher/teacher
    .venv/bin/python benchmarks/bench_store.py --codec-only   # part 3 alone: no teachers, no timing
    .venv/bin/python benchmarks/bench_store.py --compile --teachers ...   # eager vs compiled teachers (store.compile)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from libkd.config import StoreConfig, load_config
from libkd.models import create_model
from libkd.store import LogitStore, decode, encode, record_dtype
from libkd.store.format import view_spec
from libkd.store.precompute import load_teachers, precompute
from libkd.data import build_dataset


def raw_inference(cfg, images: int, per_teacher: bool = False) -> float | dict[str, float]:
    """Teachers' images/s on pre-made normalised tensors, same batch size, no data pipeline (compiled as
    ``cfg.store.compile`` says, at the one batch shape precompute uses); with ``per_teacher``, each teacher's alone."""
    from libkd.store.precompute import FixedBatch

    dataset = build_dataset(cfg.data, "train", seed=cfg.seed)
    size, mean, std = view_spec(cfg.data, dataset)
    teachers = load_teachers(cfg.store.teachers, dataset.classes, torch.device("cpu"))
    if cfg.store.compile:
        for t in teachers:
            t.model = FixedBatch(torch.compile(t.model, dynamic=False), cfg.store.batch_size)
    batch = torch.randn(cfg.store.batch_size, 3, size, size)

    def rate(group) -> float:
        with torch.inference_mode():
            for t in group:  # warm-up (and compilation)
                t.model(t.prepare(batch, mean, std, size))
            start, done = time.perf_counter(), 0
            while done < images:
                for t in group:
                    t.model(t.prepare(batch, mean, std, size))
                done += len(batch)
        return done / (time.perf_counter() - start)

    if per_teacher:
        return {t.meta["arch"]["name"]: rate([t]) for t in teachers}
    return rate(teachers)


def compile_comparison(cfg, images: int) -> dict:
    """Eager against compiled teachers, side by side: each teacher's raw inference, then a whole precompute run."""
    out = {}
    for compiled in (False, True):
        run = cfg.model_copy(update={"store": cfg.store.model_copy(update={"compile": compiled,
                                                                            "path": f"{cfg.store.path}-{int(compiled)}"})})
        key = "compiled" if compiled else "eager"
        out[f"raw_{key}"] = raw_inference(run, images, per_teacher=True)
        start = time.perf_counter()
        stats = precompute(run)
        out[f"precompute_{key}_img_s"] = stats["images_per_s"]
        out[f"precompute_{key}_wall_s"] = time.perf_counter() - start  # compilation included
    return out


def student_step_seconds(num_teachers: int, batch: int, reps: int = 5) -> float:
    model = create_model("kdvit_mini_patch4_32", 10, num_teachers=num_teachers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    times = []
    for i in range(reps + 1):
        start = time.perf_counter()
        loss = sum(torch.nn.functional.cross_entropy(h, y) for h in model.forward_heads(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def read_seconds(store: LogitStore, batch: int, reps: int = 300) -> float:
    rng = np.random.default_rng(0)
    times = []
    for i in range(reps):
        idx = rng.choice(store.num_samples, batch, replace=False)
        start = time.perf_counter()
        store.read(idx, i)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


TAUS = StoreConfig().topk_taus


def codec_table() -> list[dict]:
    rows = []
    for classes in (10, 100, 1000):
        row = {"classes": classes, "fp16": record_dtype("fp16", classes, 0).itemsize}
        for k in (5, 10):
            row[f"top{k}"] = record_dtype("topk", classes, k, len(TAUS)).itemsize
        rows.append(row)
    return rows


def topk_kl(classes: int = 1000, rows: int = 2000) -> list[dict]:
    """KL(full || decoded top-k) in nats at each temperature, for synthetic logits of several sharpnesses: the
    tails kept at T (``kl_topK``) and the T=1 tail spread evenly, then tempered (``kl_topK_spread``)."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for scale in (2.0, 4.0, 8.0):
        logits = torch.randn(rows, classes, generator=gen) * scale
        for tau in (1.0, *TAUS):
            p = torch.log_softmax(logits / tau, 1)
            entry = {"logit_std": scale, "tau": tau, "top1_prob": p.exp().max(1).values.mean().item()}
            for k in (5, 10, 50):
                records = encode(logits, "topk", k, TAUS)
                for name, decoded in ((f"kl_top{k}", decode(records, classes, tau, TAUS)),
                                      (f"kl_top{k}_spread", decode(records[["values", "indices", "log_rest"]], classes))):
                    q = torch.log_softmax(decoded / tau, 1)
                    entry[name] = (p.exp() * (p - q)).sum(1).mean().item()
            out.append(entry)
    return out


def print_codec(result: dict) -> None:
    print("bytes per sample per view per teacher (top-k with tails at T = " + ", ".join(f"{t:g}" for t in TAUS) + "):")
    for row in result["bytes_per_record"]:
        print(f"  {row['classes']:5d} classes: fp16 {row['fp16']:5d}   top-5 {row['top5']:3d}   top-10 {row['top10']:3d}")
    print("top-k reconstruction KL(full || decoded) at T, 1000 classes, synthetic logits (tails kept at T / T=1 tail tempered):")
    for row in result["topk_kl_1000_classes"]:
        print(f"  logit std {row['logit_std']:3.0f} T={row['tau']:g} (mean top-1 prob at T {row['top1_prob']:.2f}): "
              + "  ".join(f"top-{k} {row[f'kl_top{k}']:.4f} / {row[f'kl_top{k}_spread']:.4f}" for k in (5, 10, 50)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", help="teacher checkpoints (needed unless --codec-only)")
    parser.add_argument("--codec-only", action="store_true", help="only the bytes and top-k error tables (no timing)")
    parser.add_argument("--data-root", default="../shared/data/cifar10")
    parser.add_argument("--images", type=int, default=2048, help="training images the precompute run covers")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--store", help="an existing full store to time batch reads on (default: the one built here)")
    parser.add_argument("--compile", action="store_true",
                        help="eager against compiled teachers (store.compile), raw inference per teacher and a precompute run")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.codec_only:
        result = {"bytes_per_record": codec_table(), "topk_kl_1000_classes": topk_kl()}
        print_codec(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    if not args.teachers:
        parser.error("--teachers is needed (or --codec-only)")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [
            "data.source=imagefolder", f"data.root={args.data_root}", f"data.subset={args.images // 10}",
            f"store.path={tmp}/store", f"store.teachers=[{', '.join(args.teachers)}]", "store.views=1",
            f"store.workers={args.workers}", "store.batch_size=256", "store.shard_size=4096",
        ])
        if args.compile:
            result = compile_comparison(cfg, args.images)
            for key in ("eager", "compiled"):
                print(f"{key:8s} raw inference per teacher: " + ", ".join(f"{n} {v:.0f} img/s" for n, v in result[f"raw_{key}"].items())
                      + f"; precompute {result[f'precompute_{key}_img_s']:.0f} views/s ({result[f'precompute_{key}_wall_s']:.0f} s "
                      f"for {args.images} views, compilation included)")
            for name in result["raw_eager"]:
                print(f"compiled / eager, {name}: {result['raw_compiled'][name] / result['raw_eager'][name]:.2f}x")
            print(f"compiled / eager, precompute: {result['precompute_compiled_img_s'] / result['precompute_eager_img_s']:.2f}x")
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1))
            return
        raw = raw_inference(cfg, args.images)
        stats = precompute(cfg)
        raw_after = raw_inference(cfg, args.images)  # bracket the precompute run: the machine is noisy
        raw_mean = (raw + raw_after) / 2
        store = LogitStore(args.store or cfg.store.path)
        read_s = read_seconds(store, 128)
    step_s = student_step_seconds(store.num_teachers, 128)
    result = {
        "precompute_img_s": stats["images_per_s"], "raw_inference_img_s": raw_mean,
        "precompute_vs_raw": stats["images_per_s"] / raw_mean,
        "read_batch_ms": read_s * 1e3, "student_step_ms": step_s * 1e3, "read_vs_step_percent": 100 * read_s / step_s,
        "read_store": args.store or "built here", "bytes_per_record": codec_table(), "topk_kl_1000_classes": topk_kl(),
    }
    print(f"precompute {stats['images_per_s']:.0f} img/s vs raw teacher inference {raw_mean:.0f} img/s "
          f"({raw:.0f} before, {raw_after:.0f} after): {result['precompute_vs_raw']:.2f}x")
    print(f"batch read (128 records x {store.num_teachers} teachers): {read_s * 1e3:.3f} ms = "
          f"{result['read_vs_step_percent']:.3f} % of one student step ({step_s * 1e3:.0f} ms)")
    print_codec(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
