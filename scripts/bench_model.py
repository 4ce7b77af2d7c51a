#!/usr/bin/env python
"""Model throughput per preset: training samples/s, achieved GFLOP/s vs. a matmul peak, peak memory.

    python scripts/bench_model.py                          # tiny, small, base on this CPU (fp32)
    python scripts/bench_model.py --presets base large --device cuda --batch-size 256 --reps 20   # bf16 autocast on GPU
    python scripts/bench_model.py --presets base --device cuda --batch-size 256 --reps 20 --compile  # through torch.compile

Two training steps are timed per preset, each on LLM4WM's grid (T=16, K=64, N=8):
``pretrain`` (masked reconstruction, every backbone weight trains) and ``lora`` (one CE
fine-tuning step through the peft-wrapped model). FLOPs of one step are counted with
torch.utils.flop_counter.FlopCounterMode (matmuls/convs/attention; element-wise ops are not
counted, so the ratio is a lower bound). The peak is a dense square matmul measured in the
same process, same dtype (8192³ on a GPU, 2048³ on a CPU). Memory: torch.cuda.max_memory_allocated on GPU, else the growth of
the process's peak RSS (presets run smallest first, LoRA before pretraining; a step that
needs no more than an earlier one reads 0).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedfm.model import PRESETS, ModelConfig, build_model, parameter_summary  # noqa: E402
from fedfm.model.pretrain import Pretrainer, make_mask, masked_nmse  # noqa: E402
from fedfm.train import autocast, resolve_device  # noqa: E402

GRID = (16, 64, 8)


def matmul_peak_gflops(device: torch.device, n: int | None = None, reps: int = 10) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 2048)  # a GPU needs a large product to reach its peak
    a = torch.randn(n, n, device=device, dtype=dtype, generator=None)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_fn(mode: str, cfg: ModelConfig, batch: int, device: torch.device, compile_: bool = False):
    """Closures running one optimiser step, eager and as timed (``compile_``: through torch.compile;
    FLOPs are counted on the eager one, which runs the same arithmetic), and the model they train."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *GRID, 2, generator=gen).to(device)
    if mode == "pretrain":
        model = Pretrainer(cfg).to(device)
        mask = make_mask("random", batch, GRID, cfg.patch, gen).to(device)

        def loss_fn(fwd):
            return masked_nmse(fwd(x * ~mask[..., None], ~mask), x, mask)
    else:
        model = build_model(cfg).to(device)
        known = torch.zeros(GRID, dtype=torch.bool, device=device)
        known[:, ::4] = True
        region = torch.ones(GRID, dtype=torch.bool, device=device)

        def loss_fn(fwd):
            return masked_nmse(fwd("CE", x * known[..., None], known), x, region)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    timed_fwd = torch.compile(model) if compile_ else model

    def make_step(fwd):
        def step():
            with autocast(device):
                loss = loss_fn(fwd)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    return make_step(model), make_step(timed_fwd), model


def bench(preset: str, mode: str, batch: int, device: torch.device, reps: int, peak: float,
          compile_: bool = False) -> dict:
    cfg = ModelConfig.from_preset(preset)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    eager, step, model = step_fn(mode, cfg, batch, device, compile_)
    with FlopCounterMode(display=False) as fc:
        eager()
    flops = fc.get_total_flops()
    for _ in range(3 if compile_ else 1):  # warm-up; the first compiled call compiles
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        step()
    sync(device)
    dt = (time.perf_counter() - t) / reps
    if device.type == "cuda":
        mem_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:  # ru_maxrss is KiB on Linux
        mem_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    gflops = flops / dt / 1e9
    ps = parameter_summary(build_model(cfg))
    return {"preset": preset, "mode": mode, "params": ps["total"], "trainable_pct": ps["trainable_pct"],
            "samples_per_s": batch / dt, "gflop_per_step": flops / 1e9, "gflops": gflops,
            "peak_ratio": gflops / peak, "peak_mem_mb": mem_mb}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small", "base"], choices=list(PRESETS))
    p.add_argument("--modes", nargs="+", default=["lora", "pretrain"], choices=["pretrain", "lora"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true", help="time the step through torch.compile")
    a = p.parse_args(argv)
    if a.batch_size <= 0 or a.reps <= 0:
        p.error(f"--batch-size {a.batch_size} and --reps {a.reps}: expected integers > 0")
    try:
        device = resolve_device(a.device)
    except ValueError as e:
        p.error(str(e))
    peak = matmul_peak_gflops(device)
    dtype = "bf16 autocast" if device.type == "cuda" else "fp32"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({name}, {dtype}{', torch.compile' if a.compile else ''}); "
          f"dense matmul peak {peak:.1f} GFLOP/s; grid {GRID}, batch {a.batch_size}, torch {torch.__version__}")
    print("| preset | step | params | trainable % | samples/s | GFLOP/step | GFLOP/s | of peak | peak mem MB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for preset in a.presets:
        for mode in a.modes:
            r = bench(preset, mode, a.batch_size, device, a.reps, peak, a.compile)
            print(f"| {preset} | {mode} | {r['params']:,} | {r['trainable_pct']:.2f} | {r['samples_per_s']:.1f} | "
                  f"{r['gflop_per_step']:.1f} | {r['gflops']:.1f} | {r['peak_ratio']:.2f} | {r['peak_mem_mb']:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
