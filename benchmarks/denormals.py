"""Does flushing denormal floats to zero (`torch.set_flush_denormal(True)`) change CPU speed here?

Measures, with flushing off and on, side by side in one run (median of 3): the tiny test UNet's
forward pass at 256x256 (extract), a DDPM training step of the demo's UNet at small timesteps
(t < 20, where activations get tiny), and a ResNet50 training step (train); and whether flushing
changes the stored bytes of a DNF batch. Prints a table.

    python benchmarks/denormals.py [--steps 5] [--warmup 150]

`--warmup N` first trains the demo DDPM N steps at small t (flushing off): denormals appear as
training goes on, not at the random initialisation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import scratch_dir  # noqa: E402
from demo.ddpm import DDPMConfig, build_unet  # noqa: E402
from stages.domain.detector import build_resnet50  # noqa: E402
from stages.domain.noise_model import encode, load_noise_model, make_test_model  # noqa: E402


def timed(fn, steps: int) -> float:
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def workloads(steps: int, warmup: int = 0) -> dict:
    torch.manual_seed(0)
    tiny_dir = make_test_model(scratch_dir("dnf-denormals-") / "tiny", size=64)
    tiny = load_noise_model(tiny_dir, torch.device("cpu"))
    x = torch.rand(8, 3, 256, 256) * 2 - 1
    ddpm = build_unet(DDPMConfig())
    opt = torch.optim.Adam(ddpm.parameters(), lr=5e-4)
    crops = torch.rand(16, 3, 64, 64) * 2 - 1
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)

    def ddpm_step():
        t = torch.randint(0, 20, (16,))
        noise = torch.randn_like(crops)
        a = ac[t].view(-1, 1, 1, 1)
        loss = torch.nn.functional.mse_loss(ddpm(a.sqrt() * crops + (1 - a).sqrt() * noise, t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(warmup):
        ddpm_step()
    r50 = build_resnet50(seed=0)
    opt2 = torch.optim.Adam(r50.parameters(), lr=1e-4)
    batch, y = torch.rand(8, 3, 128, 128), torch.randint(0, 2, (8,)).float()

    def r50_step():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(r50(batch).squeeze(1), y)
        opt2.zero_grad()
        loss.backward()
        opt2.step()

    return {"extract: tiny UNet forward, 8 x 256x256": (lambda: tiny.predict(x), max(1, steps)),
            "demo DDPM training step, t < 20, 16 x 64x64": (ddpm_step, steps),
            "ResNet50 training step, 8 x 128x128": (r50_step, max(1, steps // 2))}, tiny, x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=0, help="DDPM training steps before timing")
    args = ap.parse_args()
    if not torch.set_flush_denormal(False):
        raise SystemExit("this CPU has no flush-to-zero control (no SSE3): nothing to measure")
    loads, tiny, x = workloads(args.steps, args.warmup)
    rows = []
    for name, (fn, steps) in loads.items():
        off_on = []
        for flush in (False, True, False, True):  # interleaved: the machine drifts
            torch.set_flush_denormal(flush)
            off_on.append(timed(fn, steps))
        off, on = statistics.mean(off_on[0::2]), statistics.mean(off_on[1::2])
        rows.append((name, off * 1000, on * 1000, off / on))
    torch.set_flush_denormal(False)
    ref = encode(tiny.predict(x), "reference")
    torch.set_flush_denormal(True)
    flushed = encode(tiny.predict(x), "reference")
    torch.set_flush_denormal(False)
    print("| workload | flush off ms | flush on ms | speed-up |\n|---|---|---|---|")
    for name, off, on, ratio in rows:
        print(f"| {name} | {off:.1f} | {on:.1f} | {ratio:.2f}x |")
    print(f"stored DNF bytes equal with and without flushing: {torch.equal(ref, flushed)}")


if __name__ == "__main__":
    main()
