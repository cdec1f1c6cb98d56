"""Frozen-feature probes of the quality benchmark (``benchmarks/quality.py``).

- **phones**: frame-level phone classification with festival's own phone timings. The probe is
  trained on each representation's *native* frames, each labelled with the phone at the frame's
  centre as the front end places it (:func:`mgf_sb.batch.encoder_frame_centres`: fbank frame
  ``i`` at ``10 i`` ms, a 50 Hz encoder frame in the middle of its two fbank frames), and scored
  on the common 100 frames/s labels, each 10 ms frame taking the prediction of the nearest native
  frame (:func:`mgf_sb.batch.nearest_frames`, as the TIMIT recipe scores). Linear probe =
  full-batch logistic regression (:mod:`mgf_sb.probing`) on a seeded subset of the frames of the
  probe-*train* voices; the layer **and** the L2 penalty are chosen on the *dev* voices and only
  that pair is scored on the *test* voices (three disjoint sets of held-out voices, each spanning
  every festival base voice).
- **speakers**: speaker identification over all held-out voices, linear on pooled mean + std of
  each utterance; each voice's utterances split into train / dev / test (counts per voice); the
  layer and L2 chosen on dev. Every utterance has its own random channel, so the channel does not
  identify the voice.

Both probes keep their per-utterance test outcomes (``test_items``) so that
:func:`paired_bootstrap` can put an interval on any difference between two representations
(the same test utterances for every row).

Representations (:func:`encode`): ``fbank`` (one 10 ms frame), ``fbank+-5`` (11 frames of
context), and any MGF-format encoder given as a pretrained folder or ``random`` (same
architecture and normaliser as a reference folder, weights drawn with the seed).
"""

import os

import numpy as np
import soundfile as sf
import torch

from mgf_sb.batch import encoder_frame_centres, nearest_frames
from mgf_sb.features import FeatureExtractor
from mgf_sb.probing import accuracy, context_stack, fit_logistic_regression, pooled_statistics
from mgf_sb.upstream import Upstream
from quality_corpus import frame_labels, phone_inventory

HOP = 160  # 10 ms at 16 kHz
SR = 16000
PHONE_L2_GRID = (1e-4, 1e-3, 1e-2)
SPEAKER_L2_GRID = (1e-3, 1e-2, 1e-1)


def _voice_base(corpus):
    """speaker id -> its synthesiser base voice (for balanced splits); ids alone when unknown."""
    return {s["id"]: s.get("voice", "") for s in corpus.get("probe_speakers", [])}


class ProbeData:
    """The held-out probe corpus in memory, with its splits.

    Arguments
    ---------
    corpus : dict
        ``corpus.json`` of ``quality_corpus.build_corpus``.
    phone_split : (float, float)
        Shares of the probe voices used as phone-probe dev and test voices (the rest train).
        Voices are ordered round-robin over their base voices (one of each base in turn), the
        first ones going to test, then dev, the rest train, so every role spans the base voices.
    speaker_split : (int, int)
        Utterances of each voice used as speaker-probe dev and test utterances (the rest, at
        least one, train).

    Attributes
    ----------
    wavs : list of np.ndarray
        (samples,) float32 waveforms.
    labels : list of np.ndarray
        (n_fbank_frames,) int64 phone index at each 10 ms frame centre (``10 i`` ms).
    phone_segments : list
        Each utterance's ``[(start_s, end_s, phone)]``.
    speaker : np.ndarray
        (U,) int64 speaker index.
    phone_role, speaker_role : np.ndarray
        (U,) "train" | "dev" | "test".
    phones : list of str
        The phone inventory (class names).
    """

    def __init__(self, corpus, phone_split=(0.25, 0.25), speaker_split=(4, 20)):
        rows = sorted(corpus["probe"], key=lambda r: r["path"])
        folder = corpus["folder"]
        self.phones = phone_inventory(rows)
        self.inventory = {p: i for i, p in enumerate(self.phones)}
        speakers = sorted({r["speaker"] for r in rows})
        spk_index = {s: i for i, s in enumerate(speakers)}
        self.n_speakers = len(speakers)
        n_dev = max(1, int(round(phone_split[0] * len(speakers))))
        n_test = max(1, int(round(phone_split[1] * len(speakers))))
        if n_dev + n_test >= len(speakers):
            raise ValueError(f"need more than {n_dev + n_test} probe voices for the phone splits")
        # deal voices out base by base, so that each role spans the base voices
        base = _voice_base(corpus)
        by_base = {}
        for s in sorted(speakers):
            by_base.setdefault(base.get(s, ""), []).append(s)
        order = []  # round-robin over bases: one voice of each base at a time
        while any(by_base.values()):
            for b in sorted(by_base):
                if by_base[b]:
                    order.append(by_base[b].pop(0))
        voice_role = {s: ("test" if i < n_test else "dev" if i < n_test + n_dev else "train")
                      for i, s in enumerate(order)}
        self.voice_role = voice_role
        self.wavs, self.labels, self.phone_segments, self.ids = [], [], [], []
        spk, prole, srole = [], [], []
        by_speaker = {}
        for r in rows:
            by_speaker.setdefault(r["speaker"], []).append(r)
        nd, nt = speaker_split
        for s in speakers:
            utts = by_speaker[s]
            n = len(utts)
            if nd + nt >= n:
                raise ValueError(f"voice {s} has {n} utterances: too few for {nd} dev + {nt} test speaker-probe "
                                 f"utterances and at least one to train on")
            for j, r in enumerate(utts):
                wav, sr = sf.read(os.path.join(folder, r["path"]), dtype="float32")
                if sr != SR:
                    raise ValueError(f"{r['path']}: expected {SR} Hz, got {sr}")
                self.wavs.append(wav)
                segs = [tuple(p) for p in r["phones"]]
                self.phone_segments.append(segs)
                self.labels.append(self.labels_at(segs, len(wav), 1))
                self.ids.append(os.path.splitext(os.path.basename(r["path"]))[0])
                spk.append(spk_index[s])
                prole.append(voice_role[s])
                srole.append("train" if j < n - nd - nt else "dev" if j < n - nt else "test")
        self.speaker = np.array(spk, dtype=np.int64)
        self.phone_role = np.array(prole)
        self.speaker_role = np.array(srole)
        self._native_labels = {}

    def labels_at(self, segments, n_samples, frame_stack):
        """Phone index of each native frame of a representation stacking ``frame_stack`` fbank frames."""
        centres = encoder_frame_centres(n_samples, HOP, frame_stack) / SR
        return frame_labels(segments, centres, inventory=self.inventory)

    def native_labels(self, i, frame_stack):
        """Labels of utterance ``i`` at the native rate (cached per frame_stack)."""
        key = (i, frame_stack)
        if key not in self._native_labels:
            self._native_labels[key] = self.labels_at(self.phone_segments[i], len(self.wavs[i]), frame_stack)
        return self._native_labels[key]

    def to_100fps(self, i, frame_stack):
        """(n_fbank_frames,) index of the native frame nearest to each 10 ms frame centre."""
        n = len(self.wavs[i])
        return nearest_frames(encoder_frame_centres(n, HOP, frame_stack), encoder_frame_centres(n, HOP, 1))

    def __len__(self):
        return len(self.wavs)

    def batches(self, batch_size):
        """Yields (indices, wavs (B, samples), wav_lens (B,)) in order, zero-padded."""
        for a in range(0, len(self.wavs), batch_size):
            idx = list(range(a, min(a + batch_size, len(self.wavs))))
            n = max(len(self.wavs[i]) for i in idx)
            w = torch.zeros(len(idx), n)
            for k, i in enumerate(idx):
                w[k, : len(self.wavs[i])] = torch.from_numpy(self.wavs[i])
            lens = torch.tensor([len(self.wavs[i]) / n for i in idx])
            yield idx, w, lens


class Layer:
    """One representation of every utterance at its native frame rate.

    ``frames(i)``: (native frames, D) of utterance ``i``, with ``context`` neighbours concatenated
    on each side (fbank +-5), expanded on demand so memory stays at the native size.
    ``stack``: fbank frames per native frame (1: 100 Hz, 2: 50 Hz).
    """

    def __init__(self, native, stack=1, context=0):
        self.native, self.stack, self.context = native, stack, context

    def frames(self, i):
        h = self.native[i]
        if self.context:
            h = context_stack(h[None], torch.tensor([h.shape[0]]), self.context)[0]
        return h


@torch.no_grad()
def encode(data: ProbeData, kind, source=None, reference=None, seed=0, batch_size=16, device="cpu"):
    """Every representation of every probe utterance.

    Arguments
    ---------
    kind : str
        ``fbank`` | ``fbank+-5`` | ``encoder`` (a pretrained folder ``source``) | ``random``
        (architecture and normaliser of ``reference``, weights from ``seed``).

    Returns
    -------
    layers : list of Layer
        One per representation (fbank: 1; encoder: input embedding + each layer).
    pooled : list of torch.Tensor
        (U, 2 * D_native) mean + std over each utterance's native frames, one per layer
        (fbank +-5: of the single frames, which context cannot change).
    """
    if kind in ("fbank", "fbank+-5"):
        fe = FeatureExtractor(n_mels=80, frame_stack=1)
        fe.train()  # global statistics from the probe-train utterances only
        for i in np.flatnonzero(data.phone_role == "train"):
            fe(torch.from_numpy(data.wavs[i])[None], torch.ones(1), epoch=0)
        fe.eval()
        up, stack = None, 1
    else:
        if kind == "random":
            torch.manual_seed(seed)
            up = Upstream("random", reference=reference)
        else:
            up = Upstream(source)
        up = up.to(device).eval()
        stack = up.features.frame_stack
    native, pooled = None, None
    for idx, wavs, lens in data.batches(batch_size):
        if up is None:
            layers, n = fe(wavs, lens, epoch=10**9)
            layers = [layers]
        else:
            layers, n = up(wavs.to(device), lens.to(device))
            layers = [h.float().cpu() for h in layers]
            n = n.cpu()
        if native is None:
            native = [[] for _ in layers]
            pooled = [[] for _ in layers]
        for li, h in enumerate(layers):
            pooled[li].append(pooled_statistics(h, n))
            native[li] += [h[k, : int(n[k])].clone() for k in range(len(idx))]
    for k in range(len(data)):  # the front end and the label formula must agree on the frame count
        expect = len(data.native_labels(k, stack))
        if native[0][k].shape[0] != expect:
            raise RuntimeError(f"utterance {data.ids[k]}: {native[0][k].shape[0]} frames from the front end, "
                               f"{expect} frame centres from encoder_frame_centres (frame_stack {stack})")
    context = 5 if kind == "fbank+-5" else 0
    return [Layer(h, stack, context) for h in native], [torch.cat(p) for p in pooled]


def _train_frames(layer, data, max_frames=None, seed=0):
    """Native frames (N, D) and labels (N,) of the probe-train voices (a seeded random subset of
    ``max_frames`` frames when there are more)."""
    idx = np.flatnonzero(data.phone_role == "train")
    y = torch.from_numpy(np.concatenate([data.native_labels(i, layer.stack) for i in idx]))
    x = torch.cat([layer.frames(i) for i in idx])
    if max_frames and y.shape[0] > max_frames:
        g = torch.Generator().manual_seed(int(seed))
        keep = torch.randperm(y.shape[0], generator=g)[:max_frames].sort().values
        x, y = x[keep], y[keep]
    return x, y


def _score_100fps(probe, layer, data, role):
    """Per-utterance (correct, frames) at 100 frames/s for the utterances of phone role ``role``."""
    out = []
    for i in np.flatnonzero(data.phone_role == role):
        pred = probe.predict(layer.frames(i)).numpy()[data.to_100fps(i, layer.stack)]
        out.append((int((pred == data.labels[i]).sum()), int(len(data.labels[i]))))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def phone_probe(frames, data: ProbeData, seed=0, max_train_frames=30000, l2_grid=PHONE_L2_GRID, max_iter=200):
    """Frame-level phone probe; layer and L2 chosen on the dev voices.

    Arguments
    ---------
    frames : list of Layer
        One per representation layer.
    data : ProbeData
    seed : int
        Draws the ``max_train_frames`` training frames (the same frames for every layer).

    Returns
    -------
    dict
        ``dev``: best dev accuracy of each layer over the L2 grid (%), ``layer`` and ``l2``: the
        chosen pair, ``dev_best``: its dev accuracy (%), ``dev_items``: [[correct, frames]] per dev
        utterance at that pair (for comparing two encoders on dev), ``test``: its test accuracy
        (%, frames at 100 fps), ``test_items``: [[correct, frames]] per test utterance, ``test_ids``.
    """
    n_classes = len(data.phones)
    dev, best = [], None
    for li, layer in enumerate(frames):
        x, y = _train_frames(layer, data, max_train_frames, seed)
        layer_best = -1.0
        for l2 in l2_grid:
            probe = fit_logistic_regression(x, y, n_classes, l2=l2, class_balanced=False, max_iter=max_iter)
            c = _score_100fps(probe, layer, data, "dev")
            acc = 100.0 * c[:, 0].sum() / c[:, 1].sum()
            layer_best = max(layer_best, acc)
            if best is None or acc > best[0]:
                best = (acc, li, l2, probe, c)
        dev.append(layer_best)
    acc, li, l2, probe, dev_items = best
    items = _score_100fps(probe, frames[li], data, "test")
    return {"dev": dev, "layer": li, "l2": l2, "dev_best": acc, "dev_items": dev_items.tolist(),
            "test": 100.0 * items[:, 0].sum() / items[:, 1].sum(), "test_items": items.tolist(),
            "test_ids": [data.ids[i] for i in np.flatnonzero(data.phone_role == "test")]}


def speaker_probe(pooled, data: ProbeData, l2_grid=SPEAKER_L2_GRID, max_iter=200):
    """Speaker identification on pooled statistics; layer and L2 chosen on dev utterances.

    Returns
    -------
    dict
        ``dev`` (best dev accuracy of each layer over the L2 grid), ``layer``, ``l2``, ``dev_best``,
        ``dev_items`` (1/0 per dev utterance at that layer and L2), ``test`` (%), ``test_items`` (1/0 per test utterance), ``test_ids``, ``n_test``.
    """
    tr, dv, te = (torch.from_numpy(data.speaker_role == r) for r in ("train", "dev", "test"))
    y = torch.from_numpy(data.speaker)
    best, dev_per_layer = None, []
    for li, x in enumerate(pooled):
        layer_best = -1.0
        for l2 in l2_grid:
            probe = fit_logistic_regression(x[tr], y[tr], data.n_speakers, l2=l2, max_iter=max_iter)
            pred = probe.predict(x[dv])
            acc = 100 * accuracy(pred, y[dv])
            layer_best = max(layer_best, acc)
            if best is None or acc > best[0]:
                best = (acc, li, l2, probe, (pred == y[dv]).long())
        dev_per_layer.append(layer_best)
    acc, li, l2, probe, dev_correct = best
    correct = (probe.predict(pooled[li][te]) == y[te]).long()
    return {"dev": dev_per_layer, "layer": li, "l2": l2, "dev_best": acc, "dev_items": dev_correct.tolist(), "test": 100.0 * correct.double().mean().item(),
            "test_items": correct.tolist(), "test_ids": [data.ids[i] for i in np.flatnonzero(data.speaker_role == "test")],
            "n_test": int(te.sum())}


def run_probes(data, kind, source=None, reference=None, seed=0, max_train_frames=30000, max_iter=200,
               device="cpu"):
    """Encodes the probe corpus with one representation and runs both probes -> dict."""
    frames, pooled = encode(data, kind, source=source, reference=reference, seed=seed, device=device)
    return {
        "phones": phone_probe(frames, data, seed=seed, max_train_frames=max_train_frames, max_iter=max_iter),
        "speakers": speaker_probe(pooled, data, max_iter=max_iter),
        "n_layers": len(frames),
        "frame_stack": frames[0].stack,
    }


# ----------------------------------------------------------------------------------------------
# Intervals
# ----------------------------------------------------------------------------------------------
def _as_counts(items):
    """test_items of one probe -> (N, 2) float (correct, total) per test utterance."""
    a = np.asarray(items, dtype=np.float64)
    return a if a.ndim == 2 else np.stack([a, np.ones_like(a)], axis=1)


def paired_bootstrap(a_seeds, b_seeds, n_boot=4000, rng_seed=0, level=0.95):
    """Difference of accuracies A - B (points) with a bootstrap interval.

    Each replicate resamples the test utterances with replacement (the same draw for A and B:
    paired, as both were scored on the same utterances) and, independently for A and for B, the
    pretraining seeds with replacement; an accuracy is the mean over the drawn seeds of
    ``sum(correct) / sum(frames)`` over the drawn utterances. The interval therefore covers both
    the test-set sampling and the seed-to-seed spread.

    Arguments
    ---------
    a_seeds, b_seeds : list
        One ``test_items`` list per seed (phones: [[correct, frames]] per utterance; speakers:
        [0/1] per utterance), every list over the same utterances in the same order.

    Returns
    -------
    dict
        ``diff`` (mean over seeds of A minus that of B, points), ``low``, ``high`` (the central
        ``level`` interval), ``resolved`` (the interval excludes 0), ``n_items``, ``n_boot``.
    """
    A = np.stack([_as_counts(s) for s in a_seeds])  # (Sa, N, 2)
    B = np.stack([_as_counts(s) for s in b_seeds])
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"the two rows were scored on different test sets ({A.shape[1]} vs {B.shape[1]} items)")
    n = A.shape[1]
    rng = np.random.default_rng(rng_seed)
    diff = 100.0 * (np.mean(A[:, :, 0].sum(1) / A[:, :, 1].sum(1)) - np.mean(B[:, :, 0].sum(1) / B[:, :, 1].sum(1)))
    out = np.empty(n_boot)
    chunk = 500
    for c0 in range(0, n_boot, chunk):
        m = min(chunk, n_boot - c0)
        w = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(m)]).astype(np.float64)  # (m, N)

        def acc(X):
            per_seed = (w @ X[:, :, 0].T) / (w @ X[:, :, 1].T)  # (m, S)
            pick = rng.integers(0, X.shape[0], (m, X.shape[0]))
            return np.take_along_axis(per_seed, pick, axis=1).mean(1)

        out[c0:c0 + m] = 100.0 * (acc(A) - acc(B))
    lo, hi = np.percentile(out, [50 * (1 - level), 50 * (1 + level)])
    return {"diff": float(diff), "low": float(lo), "high": float(hi), "resolved": bool(lo > 0 or hi < 0),
            "n_items": int(n), "n_boot": int(n_boot)}
