"""Training-step throughput of the GRU decoder (forward + backward + optimizer step).

Sizes: the embedded default (2 x 256) and the published model (5 x 768), batch of trials of
typical length (~5 s). Prints ms/step and trials/s for each on the device given (CPU by
default; `--device cuda` on a GPU machine, with `--bf16` for autocast).

    python benchmarks/train_throughput.py [--device cpu] [--steps 5] [--batch-size 64] [--bf16]
"""

from __future__ import annotations

import argparse
import time

import torch

from b2txt.models import GRUDecoder, GRUDecoderConfig

SIZES = {"default (2x256)": (2, 256), "published (5x768)": (5, 768)}


def bench(n_layers: int, n_units: int, device: torch.device, batch: int, steps: int, bf16: bool, n_bins: int) -> float:
    torch.manual_seed(0)
    model = GRUDecoder(GRUDecoderConfig(n_days=8, n_layers=n_layers, n_units=n_units)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=0.1)
    ctc = torch.nn.CTCLoss(zero_infinity=True)
    x = torch.randn(batch, n_bins, 512, device=device)
    day = torch.randint(0, 8, (batch,), device=device)
    targets = torch.randint(1, 41, (batch, 40), device=device)
    out_len = torch.full((batch,), int(model.output_lengths(n_bins)), dtype=torch.long)
    tgt_len = torch.full((batch,), 40, dtype=torch.long)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x, day)
        loss = ctc(logits.float().log_softmax(-1).transpose(0, 1), targets, out_len, tgt_len)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--bins", type=int, default=250, help="time bins per trial (20 ms each)")
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size} x {args.bins} bins, bf16 {args.bf16}")
    for name, (layers, units) in SIZES.items():
        s = bench(layers, units, device, args.batch_size, args.steps, args.bf16, args.bins)
        print(f"{name:20s} {1000 * s:9.1f} ms/step {args.batch_size / s:9.1f} trials/s")


if __name__ == "__main__":
    main()
