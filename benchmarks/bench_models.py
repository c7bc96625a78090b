"""Forward (inference) and training-step throughput of the CIFAR teachers and students, in images/s.

Models are built from the shipped recipes, all measured in one run; with several ``--amp`` modes each model
is measured in each mode back to back and the last column is the speed-up of the last mode over the first.

    .venv/bin/python benchmarks/bench_models.py
    .venv/bin/python benchmarks/bench_models.py --amp none bf16        # is bf16 autocast worth it on this CPU?
    .venv/bin/python benchmarks/bench_models.py --device cuda --amp bf16 --batch 256
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from libkd.config import load_config
from libkd.engine import autocast
from libkd.models import count_parameters, create_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def models() -> dict[str, torch.nn.Module]:
    built = {}
    for recipe in ("cifar10-resnet-teacher", "cifar10-rednet-teacher", "cifar10-10pct-teacher-conv",
                   "cifar10-10pct-teacher-inv"):
        t = load_config(CONFIGS / f"{recipe}.yaml").teacher
        built[f"{t.name} ({recipe})"] = create_model(t.name, 10, cifar_stem=t.cifar_stem, **t.kwargs)
    built["kdvit_mini_patch4_32, 0 teachers"] = create_model("kdvit_mini_patch4_32", 10)
    built["kdvit_mini_patch4_32, 2 teachers"] = create_model("kdvit_mini_patch4_32", 10, num_teachers=2)
    built["kdvit_micro_patch4_32, 2 teachers"] = create_model("kdvit_micro_patch4_32", 10, num_teachers=2)
    built["kdvit_tiny_patch4_32, 2 teachers"] = create_model("kdvit_tiny_patch4_32", 10, num_teachers=2)
    return built


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: torch.device, seconds: float) -> float:
    """Calls per second of ``fn`` after two warm-up calls, over at least ``seconds``."""
    fn(), fn()
    sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            return calls / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--amp", nargs="+", default=["none"], choices=["none", "bf16", "fp16"],
                        help="autocast modes, each model measured in each, back to back")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum measuring time per case")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    rows = []
    print(f"device {device}, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'model':48} {'params':>8} {'amp':>5} {'forward img/s':>14} {'train img/s':>12} {'train x':>8}")
    for name, model in models().items():
        model = model.to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        first_train = None
        for amp in args.amp:

            def forward():
                with torch.inference_mode(), autocast(device, amp):
                    model.eval()(x)

            def train_step():
                model.train()
                with autocast(device, amp):
                    heads = model.forward_heads(x) if hasattr(model, "forward_heads") else [model(x)]
                    loss = sum(torch.nn.functional.cross_entropy(h.float(), y) for h in heads)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            fwd = measure(forward, device, args.seconds) * args.batch
            trn = measure(train_step, device, args.seconds) * args.batch
            first_train = first_train or trn
            rows.append({"model": name, "params_m": count_parameters(model) / 1e6, "forward_img_s": fwd,
                         "train_img_s": trn, "device": str(device), "batch": args.batch, "amp": amp})
            print(f"{name:48} {count_parameters(model) / 1e6:7.2f}M {amp:>5} {fwd:14.0f} {trn:12.0f} "
                  f"{trn / first_train:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
