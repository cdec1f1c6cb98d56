#!/usr/bin/env python3
"""Pretraining throughput on one batch: encoder alone, frame-only step, full MGF step.

    python benchmarks/pretrain_throughput.py hparams/mgf.yaml [--device=cuda] [--precision=bf16] [overrides]

Prints audio seconds processed per second (fwd + bwd + optimiser step) and the
ratio of the full MGF step time to the frame-only step time (goal <= 1.35).
The batch is ``--batch_utts`` utterances of ``--utt_seconds`` of noise-like audio
(the cost does not depend on the content). A benchmark, not a test.
"""

import argparse
import platform
import statistics
import sys
import time

import torch
from hyperpyyaml import load_hyperpyyaml

from mgf_sb.batch import MGFCollate
from mgf_sb.pretraining import mgf_forward


def build(hparams_file, overrides):
    with open(hparams_file) as f:
        hp = load_hyperpyyaml(f, overrides)
    hp["target"].attach(hp["encoder"])
    # Resolved from the data by the recipe (mgf_sb.lr_schedule.resolve_schedule); any count does for
    # timing: ema_steps for ema_schedule=ramp, total_steps for ema_schedule=half_life (the default).
    if hp["target"].ema_steps is None:
        hp["target"].ema_steps = 1000
    if hp["target"].total_steps is None:
        hp["target"].total_steps = 1000
    return hp


def make_step(hp, device, dtype, mode):
    features, encoder = hp["features"].to(device), hp["encoder"].to(device)
    objectives, target = hp["objectives"].to(device), hp["target"].to(device)
    if target.teacher is not None:
        target.teacher.to(device)
    params = list(encoder.parameters()) + list(objectives.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(batch):
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            inputs = mgf_forward(features, encoder, target, batch,
                                 needs_teacher=mode != "encoder" and objectives.needs_teacher, epoch=0)
            if mode == "encoder":
                loss = inputs.hidden[-1].float().pow(2).mean()
            else:
                loss, _, _ = objectives(inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mode != "encoder":
            target.update(encoder)

    return step


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time (shared machines)
clock = CLOCK["wall"]


def timeit(step, batch, device, warmup, repeats):
    for _ in range(warmup):
        step(batch)
    if repeats == 0:
        return None
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return statistics.median(times)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hparams")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch_utts", type=int, default=8)
    p.add_argument("--utt_seconds", type=float, default=6.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--clock", default="wall", choices=sorted(CLOCK),
                   help="wall: elapsed time; cpu: the process's CPU time (robust on a shared machine; CPU only)")
    args, rest = p.parse_known_args(argv)
    global clock
    clock = CLOCK[args.clock]
    import yaml

    overrides = {}
    for item in rest:  # --key=value, parsed as YAML values like SpeechBrain's command line
        k, v = item.lstrip("-").split("=", 1)
        overrides[k] = yaml.safe_load(v)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    torch.manual_seed(0)
    base = build(args.hparams, overrides)
    sr = base["sample_rate"]
    items = [{"id": str(i), "sig": 0.1 * torch.randn(int(args.utt_seconds * sr))} for i in range(args.batch_utts)]

    def make_batch(hp):
        """The batch a run with these settings would see: its own collate, so a
        variant with a disabled scale draws no masks for it (as in training)."""
        torch.manual_seed(0)
        return MGFCollate(**{**hp["collate_args"], "crop_seconds": args.utt_seconds})(items).to(device)

    batch = make_batch(base)
    audio_s = args.batch_utts * args.utt_seconds  # distinct audio (mask copies not counted)

    # Statistics for the normaliser (one pass in train mode).
    # Interleaved rounds (A B C A B C ...) so that drifting machine load hits
    # every variant alike; the median over rounds is reported.
    variants = [
        ("encoder fwd+bwd alone", "encoder", {}),
        ("frame-scale-only step", "step", {"use_phoneme": False, "use_utterance": False}),
        ("full MGF step", "step", {}),
    ]
    steps, batches = [], []
    for name, mode, extra in variants:
        torch.manual_seed(0)
        hp = build(args.hparams, {**overrides, **extra})
        steps.append(make_step(hp, device, dtype, mode))
        batches.append(make_batch(hp))
    for step, b in zip(steps, batches):
        timeit(step, b, device, args.warmup, 0)
    times = [[] for _ in steps]
    for _ in range(args.repeats):
        for i, (step, b) in enumerate(zip(steps, batches)):
            times[i].append(timeit(step, b, device, 0, 1))
    rows = [(name, statistics.median(t), audio_s / statistics.median(t)) for (name, _, _), t in zip(variants, times)]

    n_params = sum(p.numel() for p in base["encoder"].parameters())
    print(f"\nMGF pretraining throughput - {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"device {device}, {args.precision}, threads {torch.get_num_threads()}, clock {args.clock}")
    print(f"encoder {n_params / 1e6:.2f} M params, frame_stack {base['frame_stack']}, batch {args.batch_utts} x "
          f"{args.utt_seconds:.1f} s ({len(batch)} student sequences: views x mask_copies "
          f"{base['collate_args'].get('mask_copies', 1)}), median of {args.repeats}\n")
    print("| step | time per batch (s) | audio s / s |")
    print("|---|---|---|")
    for name, t, thr in rows:
        print(f"| {name} | {t:.3f} | {thr:.1f} |")
    ratio = rows[2][1] / rows[1][1]
    print(f"\nfull / frame-only step time: {ratio:.2f} (goal <= 1.35)")
    return ratio


if __name__ == "__main__":
    main(sys.argv[1:])
