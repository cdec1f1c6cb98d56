"""Frozen-feature probes of the quality benchmark (``benchmarks/quality.py``).

- **phones**: frame-level phone classification (festival's own phone timings, scored at 100
  frames/s whatever the encoder's rate: an encoder frame is repeated over the fbank frames it
  covers). Linear probe = full-batch logistic regression (:mod:`mgf_sb.probing`) fitted on the
  frames of the probe-*train* voices, one fit per layer; the layer is chosen on the *dev* voices
  and only that layer is scored on the *test* voices (three disjoint sets of held-out voices).
- **speakers**: speaker identification over all held-out voices, linear on pooled mean + std of
  each utterance; utterances of every voice split into train / dev / test; layer and L2 chosen
  on dev.

Representations (:func:`representations`): ``fbank`` (one 10 ms frame), ``fbank+-5`` (11 frames
of context), and any MGF encoder given as a pretrained folder or ``random`` (same architecture
and normaliser as a reference folder, weights drawn with the seed).
"""

import os

import numpy as np
import soundfile as sf
import torch

from mgf_sb.data.quality_corpus import frame_labels, phone_inventory
from mgf_sb.features import FeatureExtractor
from mgf_sb.probing import accuracy, context_stack, fit_logistic_regression, pooled_statistics
from mgf_sb.upstream import Upstream

HOP = 160  # 10 ms at 16 kHz


class ProbeData:
    """The held-out probe corpus in memory, with its splits.

    Arguments
    ---------
    corpus : dict
        ``corpus.json`` of :func:`mgf_sb.data.quality_corpus.build_corpus`.
    phone_split : (float, float)
        Shares of the probe voices used as phone-probe dev and test voices (the rest train);
        voices are assigned in id order, which cycles through the festival base voices.
    speaker_split : (float, float)
        Shares of each voice's utterances used as speaker-probe dev and test utterances.

    Attributes
    ----------
    wavs : list of np.ndarray
        (samples,) float32 waveforms.
    labels : list of np.ndarray
        (n_fbank_frames,) int64 phone index of each 10 ms frame.
    speaker : np.ndarray
        (U,) int64 speaker index.
    phone_role, speaker_role : np.ndarray
        (U,) "train" | "dev" | "test".
    phones : list of str
        The phone inventory (class names).
    """

    def __init__(self, corpus, phone_split=(0.25, 0.25), speaker_split=(0.2, 0.3)):
        rows = sorted(corpus["probe"], key=lambda r: r["path"])
        folder = corpus["folder"]
        self.phones = phone_inventory(rows)
        inv = {p: i for i, p in enumerate(self.phones)}
        speakers = sorted({r["speaker"] for r in rows})
        spk_index = {s: i for i, s in enumerate(speakers)}
        self.n_speakers = len(speakers)
        n_dev = max(1, int(round(phone_split[0] * len(speakers))))
        n_test = max(1, int(round(phone_split[1] * len(speakers))))
        if n_dev + n_test >= len(speakers):
            raise ValueError(f"need more than {n_dev + n_test} probe voices for the phone splits")
        voice_role = {s: ("test" if i < n_test else "dev" if i < n_test + n_dev else "train")
                      for i, s in enumerate(speakers)}
        self.wavs, self.labels, spk, prole, srole, self.ids = [], [], [], [], [], []
        by_speaker = {}
        for r in rows:
            by_speaker.setdefault(r["speaker"], []).append(r)
        for s in speakers:
            utts = by_speaker[s]
            n = len(utts)
            nd = max(1, int(round(speaker_split[0] * n)))
            nt = max(1, int(round(speaker_split[1] * n)))
            if nd + nt >= n:
                raise ValueError(f"voice {s} has {n} utterances: too few for the speaker splits")
            for j, r in enumerate(utts):
                wav, sr = sf.read(os.path.join(folder, r["path"]), dtype="float32")
                if sr != 16000:
                    raise ValueError(f"{r['path']}: expected 16 kHz, got {sr}")
                self.wavs.append(wav)
                self.labels.append(frame_labels(r["phones"], len(wav) // HOP + 1, inventory=inv))
                self.ids.append(os.path.splitext(os.path.basename(r["path"]))[0])
                spk.append(spk_index[s])
                prole.append(voice_role[s])
                srole.append("train" if j < n - nd - nt else "dev" if j < n - nt else "test")
        self.speaker = np.array(spk, dtype=np.int64)
        self.phone_role = np.array(prole)
        self.speaker_role = np.array(srole)

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


def _to_100fps(h, n_fb, stack):
    """(T_enc, D) encoder frames -> (n_fb, D): each frame repeated ``stack`` times, cut / edge-padded."""
    if stack > 1:
        h = h.repeat_interleave(stack, dim=0)
    if h.shape[0] >= n_fb:
        return h[:n_fb]
    return torch.cat([h, h[-1:].expand(n_fb - h.shape[0], -1)])


class Layer:
    """One representation of every utterance, kept at its native frame rate.

    ``frames(i)`` gives utterance ``i`` at 100 frames/s: (n_fbank_frames, D), each encoder frame
    repeated over the ``stack`` fbank frames it covers, then ``context`` neighbours concatenated
    on each side (fbank +-5). Expanding on demand keeps memory at the native size.
    """

    def __init__(self, native, n_fb, stack=1, context=0):
        self.native, self.n_fb, self.stack, self.context = native, n_fb, stack, context

    def frames(self, i):
        h = _to_100fps(self.native[i], self.n_fb[i], self.stack)
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
    n_fb = [len(lab) for lab in data.labels]
    context = 5 if kind == "fbank+-5" else 0
    return [Layer(h, n_fb, stack, context) for h in native], [torch.cat(p) for p in pooled]


def _stack_frames(layer, data, role, max_frames=None, seed=0):
    """Frames (N, D) and labels (N,) of the utterances with phone_role ``role`` (optionally a
    random subset of ``max_frames`` frames, drawn with ``seed``)."""
    idx = np.flatnonzero(data.phone_role == role)
    y = torch.from_numpy(np.concatenate([data.labels[i] for i in idx]))
    keep = None
    if max_frames and y.shape[0] > max_frames:
        g = torch.Generator().manual_seed(int(seed))
        keep = torch.randperm(y.shape[0], generator=g)[:max_frames].sort().values
    if isinstance(layer, Layer):
        x = torch.cat([layer.frames(i) for i in idx])
    else:  # a list of per-utterance (n_fbank_frames, D) tensors
        x = torch.cat([layer[i] for i in idx])
    if keep is not None:
        x, y = x[keep], y[keep]
    return x, y


def phone_probe(frames, data: ProbeData, seed=0, max_train_frames=30000, l2=1e-4, max_iter=200):
    """Frame-level phone probe; layer chosen on the dev voices.

    Arguments
    ---------
    frames : list
        One entry per layer: a :class:`Layer`, or a list of per-utterance (n_fbank_frames, D)
        tensors.
    data : ProbeData
    seed : int
        Draws the ``max_train_frames`` training frames (the same frames for every layer).

    Returns
    -------
    dict
        ``dev``: dev accuracy of each layer (list), ``layer``: the chosen index,
        ``test``: test accuracy (in %) of that layer, ``dev_best``: its dev accuracy (in %).
    """
    n_classes = len(data.phones)
    dev = []
    probes = []
    for li, layer in enumerate(frames):
        x, y = _stack_frames(layer, data, "train", max_train_frames, seed)
        probe = fit_logistic_regression(x, y, n_classes, l2=l2, class_balanced=False, max_iter=max_iter)
        xd, yd = _stack_frames(layer, data, "dev")
        dev.append(100 * accuracy(probe.predict(xd), yd))
        probes.append(probe)
    best = int(np.argmax(dev))
    xt, yt = _stack_frames(frames[best], data, "test")
    return {"dev": dev, "layer": best, "dev_best": dev[best], "test": 100 * accuracy(probes[best].predict(xt), yt)}


def speaker_probe(pooled, data: ProbeData, l2_grid=(1e-3, 1e-2, 1e-1), max_iter=200):
    """Speaker identification on pooled statistics; layer and L2 chosen on dev utterances.

    Returns
    -------
    dict
        ``dev`` (best dev accuracy of each layer over the L2 grid), ``layer``, ``l2``, ``test`` (%).
    """
    tr, dv, te = (torch.from_numpy(data.speaker_role == r) for r in ("train", "dev", "test"))
    y = torch.from_numpy(data.speaker)
    best, dev_per_layer = None, []
    for li, x in enumerate(pooled):
        layer_best = -1.0
        for l2 in l2_grid:
            probe = fit_logistic_regression(x[tr], y[tr], data.n_speakers, l2=l2, max_iter=max_iter)
            acc = 100 * accuracy(probe.predict(x[dv]), y[dv])
            layer_best = max(layer_best, acc)
            if best is None or acc > best[0]:
                best = (acc, li, l2, probe)
        dev_per_layer.append(layer_best)
    acc, li, l2, probe = best
    test = 100 * accuracy(probe.predict(pooled[li][te]), y[te])
    return {"dev": dev_per_layer, "layer": li, "l2": l2, "dev_best": acc, "test": test}


def run_probes(data, kind, source=None, reference=None, seed=0, max_train_frames=30000, max_iter=200,
               device="cpu"):
    """Encodes the probe corpus with one representation and runs both probes -> dict."""
    frames, pooled = encode(data, kind, source=source, reference=reference, seed=seed, device=device)
    return {
        "phones": phone_probe(frames, data, seed=seed, max_train_frames=max_train_frames, max_iter=max_iter),
        "speakers": speaker_probe(pooled, data, max_iter=max_iter),
        "n_layers": len(frames),
    }
