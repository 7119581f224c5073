"""Benchmark: bf16 autocast (``--amp``) against float32 for training on this CPU.

Where the CPU has no bf16 instructions (``avx512_bf16``, ``amx_bf16``), torch emulates bf16 and
``plantml train --amp`` warns. This measures what the warning says: the same training steps of
resnet18 (random weights, batches of 32 images at 64 px, plantml's own ``train_one_epoch``),
alternated float32 / bf16, N rounds; prints the medians and their ratio, and the CPU's bf16 flags.

Run: ``python benchmarks/cpu_amp.py [--repeats 3] [--batches 8]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from plantml.training.loop import Precision, train_one_epoch
from plantml.training.models import WeightsChoice, build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    batches = [(torch.randn(32, 3, 64, 64), torch.randint(0, 2, (32,))) for _ in range(args.batches)]
    device = torch.device("cpu")
    times: dict[str, list[float]] = {"float32": [], "bf16": []}
    for _ in range(args.repeats):
        for name, dtype in (("float32", None), ("bf16", torch.bfloat16)):
            model = build_model("resnet18", 2, WeightsChoice("none"))
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            started = time.perf_counter()
            train_one_epoch(model, batches, torch.nn.CrossEntropyLoss(), optimizer, device, Precision(autocast_dtype=dtype))
            times[name].append(time.perf_counter() - started)
    flags = set(open("/proc/cpuinfo").read().split())
    print(f"cpu bf16 flags: {sorted(flags & {'avx512_bf16', 'amx_bf16'}) or 'none'}; torch threads {torch.get_num_threads()}")
    f32, bf16 = statistics.median(times["float32"]), statistics.median(times["bf16"])
    print(f"{args.batches} steps of 32 images at 64 px, medians of {args.repeats}: float32 {f32:.2f} s, "
          f"bf16 autocast {bf16:.2f} s: bf16 takes {bf16 / f32:.1f}x as long")


if __name__ == "__main__":
    main()
