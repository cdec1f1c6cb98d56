#!/usr/bin/env python3
"""Peak memory of MGF feature extraction vs utterance length (1 s to 30 s), CPU.

    python benchmarks/extraction_memory.py [--size=small|base] [--lengths=1,2,5,10,15,20,30] [--threads=1]

Method (CPU; tracemalloc does not see torch's allocations): every length runs in a
fresh subprocess that builds the encoder (random weights), runs a 1 s warm-up forward,
reads its resident set size (VmRSS), resets the kernel's peak-RSS counter (writes 5 to
/proc/self/clear_refs, which resets VmHWM), runs one ``no_grad`` forward of the whole
utterance (batch 1, fp32, no chunking) and reads VmHWM. The extra peak is VmHWM - VmRSS:
what the forward itself needed at its high-water mark (allocator reuse included, so it is
a resident-memory measurement, not an allocation count).

Then fits peak = a + b*T + c*T^2 (T = encoder frames) by least squares and compares c with
the attention's analytic cost (SpeechBrain's MultiheadAttention returns attention weights,
so the (heads, T, T) scores are materialised; scores + softmax = 2 * heads * T^2 * 4 bytes
per layer, one layer at a time). The length where c*T^2 passes b*T is where attention
starts to dominate. A benchmark (printed table), not a test.
"""

import argparse
import json
import os
import platform
import subprocess
import sys

import numpy as np

SIZES = {
    "small": dict(d_model=192, num_layers=4, nhead=4, d_ffn=768, conv_pos_kernel=33, conv_pos_groups=16),
    "base": dict(d_model=768, num_layers=12, nhead=12, d_ffn=3072, conv_pos_kernel=65, conv_pos_groups=16),
}


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def child(size, seconds, threads):
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mgf_sb.encoder import MGFEncoder
    from mgf_sb.features import FeatureExtractor

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    feats_mod = FeatureExtractor(n_mels=80)
    enc = MGFEncoder(input_size=80, dropout=0.0, **SIZES[size]).eval()
    warm = torch.randn(1, 16000) * 0.1
    feats_mod.train()
    with torch.no_grad():
        feats_mod(warm, torch.ones(1), epoch=0)
    feats_mod.eval()
    wav = torch.randn(1, int(seconds * 16000)) * 0.1

    def forward(x):
        with torch.no_grad():
            f, n = feats_mod(x, torch.ones(1), epoch=10**9)
            return enc(f, n)

    forward(warm)
    rss = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = forward(wav)
    peak = _status("VmHWM")
    print(json.dumps({"seconds": seconds, "frames": int(out[-1].shape[1]), "rss": rss, "peak": peak,
                      "extra": peak - rss, "output_bytes": sum(h.numel() * 4 for h in out)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--lengths", default="1,2,5,10,15,20,30")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.size, args.child, args.threads)
    cfg = SIZES[args.size]
    print(f"# extraction peak memory, {platform.machine()}, {os.cpu_count()} cores visible, size {args.size} {cfg}, "
          f"batch 1, fp32, {args.threads} thread(s); fresh process per length; VmHWM - VmRSS around one forward")
    rows = []
    for s in [float(x) for x in args.lengths.split(",")]:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        out = subprocess.run([sys.executable, __file__, f"--size={args.size}", f"--threads={args.threads}",
                              f"--child={s}"], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    T = np.array([r["frames"] for r in rows], dtype=float)
    y = np.array([r["extra"] for r in rows], dtype=float)
    A = np.stack([np.ones_like(T), T, T ** 2], 1)
    (a, b, c), *_ = np.linalg.lstsq(A, y, rcond=None)
    c_attn = 2 * cfg["nhead"] * 4
    print("\n| audio (s) | frames | extra peak RSS (MiB) | MiB per second of audio | all layers' outputs (MiB) "
          "| analytic attention, one layer (MiB) | fit a+bT+cT² (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r, t in zip(rows, T):
        fit = a + b * t + c * t * t
        print(f"| {r['seconds']:g} | {r['frames']} | {r['extra'] / 2**20:.1f} | {r['extra'] / 2**20 / r['seconds']:.2f} "
              f"| {r['output_bytes'] / 2**20:.1f} | {c_attn * t * t / 2**20:.1f} | {fit / 2**20:.1f} |")
    print(f"\nfit: a = {a / 2**20:.1f} MiB, b = {b / 1024:.2f} KiB/frame, c = {c:.1f} B/frame² "
          f"(analytic attention scores + softmax: {c_attn} B/frame²)")
    if c > 0 and b > 0:
        tx = b / c
        print(f"quadratic term passes the linear one at T = {tx:.0f} frames = {tx / 100:.1f} s of audio (100 Hz)")
    else:
        print("no positive quadratic term fitted (memory grows linearly over this range)")
    resid = [(r["extra"] - c_attn * t * t) / t / 1024 for r, t in zip(rows, T) if t > 500]
    print("measured minus analytic attention, per frame (the non-attention part; flat = linear): "
          + ", ".join(f"{v:.1f}" for v in resid) + " KiB/frame")

if __name__ == "__main__":
    main()
