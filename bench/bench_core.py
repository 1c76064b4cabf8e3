"""Cost of CAFM steps relative to an FM step, and Heun sampling throughput.

Everything is measured side by side in one process, interleaved round by round, and
reported as ratios to the FM step of the same run, so machine speed cancels out.

    python bench/bench_core.py                      # CPU, tiny DiT, batch 128
    python bench/bench_core.py --device cuda --dtype bfloat16 --preset small --batch 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time

import torch

from cafm_core.allocator import retain_freed_memory
from cafm_core.logits import DiscriminatorLogits
from cafm_core.models import build_generator, discriminator_from_generator, dit_config
from cafm_core.samplers import generate
from cafm_core.training import (
    CAFMConfig,
    FlowMatchingConfig,
    adam,
    discriminator_step,
    flow_matching_step,
    generator_step,
)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--sample-count", type=int, default=1024)
    parser.add_argument("--nfe", type=int, default=32)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    retain_freed_memory()  # as the pipeline's training workers do (cafm_core.allocator)
    torch.manual_seed(0)
    device = args.device
    autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    config = dit_config(args.preset, image_size=args.image_size, in_channels=args.channels, patch_size=args.patch_size, num_classes=10)
    generator = build_generator(config).to(device)
    with torch.no_grad():  # leave the adaLN-zero init so that every path carries signal
        for p in generator.parameters():
            p.add_(0.02 * torch.randn_like(p))
    discriminator = discriminator_from_generator(generator).to(device)

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)

    # Sampling first, so the process's peak RSS reflects sampling alone on CPU.
    labels = torch.arange(args.sample_count) % 10
    rss_before = _rss_mib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with autocast():
        generate(generator, num_samples=64, sample_shape=config.sample_shape, labels=labels[:64], nfe=4, device=device)
        _sync(device)
        start = time.perf_counter()
        generate(generator, num_samples=args.sample_count, sample_shape=config.sample_shape, labels=labels, nfe=args.nfe,
                 method="heun", cfg_scale=1.0, null_class=10, batch_size=256, device=device)
        _sync(device)
    sample_seconds = time.perf_counter() - start
    sampling = {
        "images_per_s": args.sample_count / sample_seconds,
        "nfe": args.nfe,
        "peak_mib": (torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else _rss_mib() - rss_before,
        "peak_kind": "cuda max_memory_allocated" if device.startswith("cuda") else "process max RSS increase",
    }

    x0 = torch.randn(args.batch, *config.sample_shape, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    batch = (x0, y)
    fm_config = FlowMatchingConfig()
    fm_opt = adam(generator.parameters(), 1e-5, fm_config.betas)
    g_opt = adam(generator.parameters(), 1e-6, (0.0, 0.95))
    d_opt = adam(discriminator.parameters(), 1e-6, (0.0, 0.95))
    cafm = {mode: CAFMConfig(logit_mode=mode) for mode in ("reverse", "forward")}
    wrappers = {mode: DiscriminatorLogits(discriminator, mode) for mode in cafm}
    kinds = {
        "fm": lambda: flow_matching_step(generator, fm_opt, batch, fm_config),
        **{f"d_{m}": (lambda m=m: discriminator_step(generator, wrappers[m], d_opt, batch, cafm[m])) for m in cafm},
        **{f"g_{m}": (lambda m=m: generator_step(generator, discriminator, g_opt, batch, cafm[m])) for m in cafm},
    }
    # The two logit modes must agree (they are two exact computations of one quantity).
    with autocast():
        probe_t = torch.rand(args.batch, device=device)
        probe_tangents = torch.stack([torch.randn_like(x0), torch.randn_like(x0)])
        reverse_logits = wrappers["reverse"](x0, probe_t, y, probe_tangents, create_graph=False)[1].float()
        forward_logits = wrappers["forward"](x0, probe_t, y, probe_tangents)[1].detach().float()
    mode_agreement = float((forward_logits - reverse_logits).norm() / reverse_logits.norm())

    times: dict[str, list[float]] = {k: [] for k in kinds}

    def run(step) -> None:
        # autocast per step, as training does (cafm_core.training.step_precision): its weight
        # cast cache lives until the context exits, so one context around many steps would
        # skip the per-step casts and run stale weights
        with autocast():
            step()

    for step in kinds.values():  # warm-up
        run(step)
    for _ in range(args.rounds):
        for name, step in kinds.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps_per_round):
                run(step)
            _sync(device)
            times[name].append((time.perf_counter() - start) / args.steps_per_round)
    median = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: median[k] / median["fm"] for k in kinds if k != "fm"}

    result = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "model": {"preset": args.preset, "image_size": args.image_size, "channels": args.channels,
                  "patch_size": args.patch_size, "parameters": sum(p.numel() for p in generator.parameters())},
        "batch": args.batch,
        "step_seconds_median": median,
        "ratio_to_fm_step": ratios,
        "sampling": sampling,
        "logit_modes_relative_difference": mode_agreement,
    }
    print(f"device {result['device']}, torch {result['torch']}, {args.dtype}, DiT-{args.preset} "
          f"({result['model']['parameters']:,} params), {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch}")
    print(f"{'step':<22}{'ms/step':>10}{'x FM step':>12}")
    labels_text = {"fm": "FM", "d_reverse": "CAFM D (reverse)", "d_forward": "CAFM D (forward)",
                   "g_reverse": "CAFM G (reverse)", "g_forward": "CAFM G (forward)"}
    for name in kinds:
        print(f"{labels_text[name]:<22}{1000 * median[name]:>10.1f}{(median[name] / median['fm']):>12.2f}")
    n = cafm["reverse"].discriminator_steps
    for mode in cafm:
        cycle = (n * median[f"d_{mode}"] + median[f"g_{mode}"]) / median["fm"]
        print(f"CAFM cycle (N={n} D + 1 G, {mode}) per step: {cycle / (n + 1):.2f}x FM")
    print(f"forward vs reverse logits: relative difference {mode_agreement:.1e}")
    print(f"Heun sampling, NFE {args.nfe}: {sampling['images_per_s']:.0f} images/s, "
          f"peak {sampling['peak_mib']:.0f} MiB ({sampling['peak_kind']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
