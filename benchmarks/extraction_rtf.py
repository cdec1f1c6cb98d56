#!/usr/bin/env python3
"""Feature-extraction speed: the MGF encoder vs SpeechBrain's wav2vec 2.0 of the same size.

    python benchmarks/extraction_rtf.py [--size=small|base|both] [--seconds=10] [--repeats=5] [--threads=2]

Both models get random weights (nothing is downloaded) and the same audio (bundled
LibriSpeech sample files concatenated to ``--seconds``), batch 1, ``torch.no_grad()``, eval
mode, fp32 on CPU. Models are timed in the same process with interleaved repeats
(A, B, C, A, B, C, ...); the speed-up is the median over repeats of the per-repeat ratio,
which cancels most of the noise of a shared machine.

- MGF: ``mgf_sb.features.FeatureExtractor`` (80 log-Mel) + ``mgf_sb.encoder.MGFEncoder``
  (SpeechBrain TransformerEncoder, pre-LN, conv positional encoding), at 100 Hz
  (``frame_stack=1``, the default) and at 50 Hz (``frame_stack=2``).
- wav2vec 2.0, built from SpeechBrain's own modules as its wav2vec2 pretraining recipe does:
  ``speechbrain.lobes.models.wav2vec.W2VLatentExtractor`` (7 conv layers, strides 5,2,2,2,2,2,2:
  50 Hz) + ``EncoderWrapper`` around the same ``TransformerEncoder`` (pre-LN, GELU).
  Parameter counts are matched: ``base`` keeps the standard 512-channel CNN and shrinks the
  wav2vec transformer's d_ffn until the totals match; ``small`` (the MGF default size, which
  is smaller than the standard CNN alone) keeps the same transformer and narrows the CNN.

Reports the real-time factor (compute seconds per audio second; lower is faster) and the
speed-up of MGF over wav2vec 2.0 (goal >= 1.5). A benchmark (printed table), not a test.
"""

import argparse
import copy
import glob
import os
import platform
import statistics
import time

import soundfile as sf
import torch
from speechbrain.lobes.models.transformer.Transformer import TransformerEncoder

from mgf_sb.encoder import _NoWeightsMHA
from speechbrain.lobes.models.wav2vec import EncoderWrapper, W2VLatentExtractor

from mgf_sb.encoder import MGFEncoder
from mgf_sb.features import FeatureExtractor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    "small": dict(d_model=192, num_layers=4, nhead=4, d_ffn=768, conv_pos_kernel=33, conv_pos_groups=16),
    "base": dict(d_model=768, num_layers=12, nhead=12, d_ffn=3072, conv_pos_kernel=65, conv_pos_groups=16),
}
W2V_KERNELS, W2V_STRIDES = [10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2]


def n_params(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


class MGF(torch.nn.Module):
    def __init__(self, cfg, frame_stack):
        super().__init__()
        self.features = FeatureExtractor(n_mels=80, frame_stack=frame_stack)
        self.encoder = MGFEncoder(input_size=80 * frame_stack, dropout=0.0, **cfg)

    def init_statistics(self, wav):
        """Accumulates normaliser statistics on ``wav`` (as the baselines do in their first epoch)."""
        self.features.train()
        with torch.no_grad():
            self.features(wav, torch.ones(wav.shape[0]), epoch=0)
        self.features.eval()

    def forward(self, wav):
        feats, n = self.features(wav, torch.ones(wav.shape[0]), epoch=10**9)
        return self.encoder(feats, n)[-1]


class W2V(torch.nn.Module):
    def __init__(self, cfg, channels, d_ffn):
        super().__init__()
        self.extractor = W2VLatentExtractor(out_channels=[channels] * 7, kernel_sizes=W2V_KERNELS,
                                            strides=W2V_STRIDES)
        enc = TransformerEncoder(num_layers=cfg["num_layers"], nhead=cfg["nhead"], d_ffn=d_ffn,
                                 d_model=cfg["d_model"], dropout=0.0, activation=torch.nn.GELU, normalize_before=True)
        self.wrapper = EncoderWrapper(channels, cfg["d_model"], enc, dropout_encoder_input=0.0)

    def forward(self, wav):
        return self.wrapper(self.extractor(wav), wav_lens=torch.ones(wav.shape[0]))["embeddings"]


def matched_w2v(cfg, target):
    """wav2vec 2.0 with about ``target`` parameters (see the module docstring).

    Counts are computed from parts (a CNN of ``c`` channels, its projection, and a transformer
    whose size is linear in d_ffn), so only the chosen model is built in full.
    """
    d, L = cfg["d_model"], cfg["num_layers"]

    def cnn(c):  # bias-free convs (k * c_in * c), a LayerNorm (2c) per block, a final LayerNorm (2c)
        return sum(k * (1 if i == 0 else c) * c for i, k in enumerate(W2V_KERNELS)) + 2 * c * 8

    probe = W2VLatentExtractor(out_channels=[24] * 7, kernel_sizes=W2V_KERNELS, strides=W2V_STRIDES)
    assert cnn(24) == n_params(probe), (cnn(24), n_params(probe))

    t0 = n_params(TransformerEncoder(num_layers=L, nhead=cfg["nhead"], d_ffn=cfg["d_ffn"], d_model=d))

    def total(c, ffn):
        return cnn(c) + c * d + d + d + t0 + L * (2 * d + 1) * (ffn - cfg["d_ffn"])

    if total(512, 4) < target:  # the standard 512-channel CNN fits: solve d_ffn
        base = total(512, cfg["d_ffn"])
        ffn = int(round(cfg["d_ffn"] + (target - base) / (L * (2 * d + 1))))
        return W2V(cfg, 512, ffn), f"CNN 7x512 (standard), transformer d_ffn={ffn}"
    c = min(range(8, 513, 4), key=lambda c: abs(total(c, cfg["d_ffn"]) - target))
    return W2V(cfg, c, cfg["d_ffn"]), f"CNN 7x{c}, transformer identical to MGF's"


def load_audio(seconds):
    files = sorted(glob.glob(os.path.join(REPO, "samples", "LibriSpeech", "*", "*", "*", "*.flac")))
    parts, total = [], 0
    for f in files:
        x, sr = sf.read(f, dtype="float32")
        parts.append(torch.from_numpy(x))
        total += len(x)
        if total >= seconds * 16000:
            break
    return torch.cat(parts)[: int(seconds * 16000)][None]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="both", choices=["small", "base", "both"])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    wav = load_audio(args.seconds)
    print(f"# extraction RTF, {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores visible, "
          f"torch {torch.__version__}, {args.threads} threads, audio {wav.shape[1] / 16000:.1f} s, batch 1, fp32")
    for size in (["small", "base"] if args.size == "both" else [args.size]):
        cfg = SIZES[size]
        models = {"MGF 100 Hz": MGF(cfg, 1).eval(), "MGF 50 Hz (frame_stack 2)": MGF(cfg, 2).eval()}
        for m in models.values():
            m.init_statistics(wav)
        target = n_params(models["MGF 100 Hz"])
        w2v, how = matched_w2v(cfg, target)
        models["wav2vec 2.0 (SB modules)"] = w2v.eval()
        # The same wav2vec 2.0 with MGF's attention path (no attention weights
        # returned -> torch's SDPA kernels): isolates the front-end/frame-rate
        # difference from SpeechBrain's default attention implementation.
        w2v_fast = copy.deepcopy(w2v).eval()
        for layer in w2v_fast.wrapper.latent_encoder.layers:
            layer.self_att.__class__ = _NoWeightsMHA
        models["wav2vec 2.0, MGF's attention path"] = w2v_fast
        times = {k: [] for k in models}
        with torch.no_grad():
            for m in models.values():  # warm-up
                m(wav)
            for _ in range(args.repeats):
                for k, m in models.items():
                    t = time.perf_counter()
                    m(wav)
                    times[k].append(time.perf_counter() - t)
        ref = times["wav2vec 2.0 (SB modules)"]
        print(f"\n## {size}: {cfg}; wav2vec 2.0: {how}")
        print("| model | parameters | frames/s | RTF (median) | speed-up vs wav2vec 2.0 (median of paired ratios) |")
        print("|---|---|---|---|---|")
        for k, m in models.items():
            rtf = statistics.median(times[k]) / (wav.shape[1] / 16000)
            ratio = statistics.median(r / t for r, t in zip(ref, times[k]))
            rate = 100 // (m.features.frame_stack) if isinstance(m, MGF) else 50
            print(f"| {k} | {n_params(m) / 1e6:.2f} M | {rate} | {rtf:.4f} | {ratio:.2f}x |")
        print(f"(per-repeat seconds: " + "; ".join(f"{k}: " + ", ".join(f"{t:.3f}" for t in v)
                                                  for k, v in times.items()) + ")")


if __name__ == "__main__":
    main()
