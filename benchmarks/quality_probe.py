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

import json
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


def _voice_base(corpus, key):
    """speaker id -> its synthesiser base voice (for balanced splits) of ``corpus[key]``."""
    return {s["id"]: s.get("base_voice", s.get("voice", "")) for s in corpus.get(key, [])}


def _read(folder, row):
    wav, sr = sf.read(os.path.join(folder, row["path"]), dtype="float32")
    if sr != SR:
        raise ValueError(f"{row['path']}: expected {SR} Hz, got {sr}")
    return wav


def round_robin(voices, base):
    """``voices`` ordered one base voice at a time (bases sorted, voices sorted within a base), so
    that any prefix spans the base voices as evenly as it can."""
    by_base = {}
    for v in sorted(voices):
        by_base.setdefault(base.get(v, ""), []).append(v)
    order = []
    while any(by_base.values()):
        for b in sorted(by_base):
            if by_base[b]:
                order.append(by_base[b].pop(0))
    return order


def make_trials(utt_voice, voices, n_each, seed):
    """Verification trials among the utterances of ``voices``: ``n_each`` target pairs (two
    different utterances of one voice, the voice drawn uniformly) and ``n_each`` non-target pairs
    (utterances of two different voices, drawn uniformly) -> (N, 2) int64 utterance indices and
    (N,) bool is-target. Deterministic given ``seed``; no pair is drawn twice."""
    rng = np.random.default_rng(seed)
    utts = {v: np.flatnonzero(utt_voice == v) for v in voices}
    voices = [v for v in voices if len(utts[v]) >= 2]
    if len(voices) < 2:
        raise ValueError("verification needs at least two voices with two utterances each")
    pairs, seen = [], set()
    for target in (True, False):
        got, tries = 0, 0
        while got < n_each and tries < 100 * n_each:
            tries += 1
            if target:
                v = voices[rng.integers(len(voices))]
                a, b = rng.choice(utts[v], 2, replace=False)
            else:
                i, j = rng.choice(len(voices), 2, replace=False)
                a, b = rng.choice(utts[voices[i]]), rng.choice(utts[voices[j]])
            key = (min(a, b), max(a, b))
            if key in seen:
                continue
            seen.add(key)
            pairs.append((a, b, target))
            got += 1
    arr = np.array(pairs, dtype=np.int64).reshape(-1, 3)
    return arr[:, :2], arr[:, 2].astype(bool)


class SpeakerSet:
    """The speaker-probe voices (``corpus["speaker"]``: held-out voices of ``SPEAKER_BASES``).

    - identification: each voice's utterances split into train / dev / test (the last
      ``speaker_split`` = (dev, test) utterances of each voice are dev and test);
    - zero-shot verification: the voices split into dev voices (``verify_dev_share``, dealt
      round-robin over base voices) and test voices; ``n_trials`` = (dev, test) target pairs, as
      many non-target pairs, among the utterances of the dev / test voices.

    Attributes: ``wavs``, ``voice`` (U,) voice index, ``base`` (U,) base-voice index, ``role``
    (U,) "train" | "dev" | "test" (identification), ``voices``, ``voice_base`` (V,) base index
    per voice, ``verify_role`` {voice: "dev" | "test"}, ``trials`` {"dev"|"test": (pairs, is_target)}.
    """

    def __init__(self, corpus, speaker_split=(4, 28), verify_dev_share=0.25, n_trials=(1000, 2000)):
        rows = sorted(corpus.get("speaker", []), key=lambda r: r["path"])
        if not rows:
            raise ValueError("the corpus has no speaker-probe set: regenerate it (quality_corpus v4)")
        base_of = _voice_base(corpus, "speaker_voices")
        self.voices = sorted({r["speaker"] for r in rows})
        bases = sorted(set(base_of.values()))
        vidx = {v: i for i, v in enumerate(self.voices)}
        self.base_names = bases
        self.voice_base = np.array([bases.index(base_of[v]) for v in self.voices])
        by_voice = {}
        for r in rows:
            by_voice.setdefault(r["speaker"], []).append(r)
        nd, nt = speaker_split
        self.wavs, self.ids, voice, role = [], [], [], []
        for v in self.voices:
            utts = by_voice[v]
            n = len(utts)
            if nd + nt >= n:
                raise ValueError(f"voice {v} has {n} utterances: too few for {nd} dev + {nt} test speaker-probe "
                                 f"utterances and at least one to train on")
            for j, r in enumerate(utts):
                self.wavs.append(_read(corpus["folder"], r))
                self.ids.append(os.path.splitext(os.path.basename(r["path"]))[0])
                voice.append(vidx[v])
                role.append("train" if j < n - nd - nt else "dev" if j < n - nt else "test")
        self.voice = np.array(voice, dtype=np.int64)
        self.base = self.voice_base[self.voice]
        self.role = np.array(role)
        order = round_robin(self.voices, base_of)
        n_dev = max(2, int(round(verify_dev_share * len(order))))
        self.verify_role = {v: ("dev" if i < n_dev else "test") for i, v in enumerate(order)}
        seed = int(corpus.get("spec", {}).get("seed", 0))
        self.trials = {}
        for k, (split, n) in enumerate(zip(("dev", "test"), n_trials)):
            vs = [vidx[v] for v in self.voices if self.verify_role[v] == split]
            self.trials[split] = make_trials(self.voice, vs, n, [seed, 11, k])


class EmotionSet:
    """The emotion-probe voices (``corpus["emotion"]``): 4 classes rendered by prosody; voices
    split into train / dev / test (``emotion_split`` = dev, test shares, dealt round-robin over
    base voices), so the probe never sees a test voice. Attributes: ``wavs``, ``label`` (U,),
    ``classes``, ``role`` (U,), ``voice`` (U,) voice ids."""

    def __init__(self, corpus, emotion_split=(0.25, 0.25)):
        rows = sorted(corpus.get("emotion", []), key=lambda r: r["path"])
        if not rows:
            raise ValueError("the corpus has no emotion-probe set: regenerate it (quality_corpus v4)")
        self.classes = sorted({r["emotion"] for r in rows})
        voices = sorted({r["speaker"] for r in rows})
        order = round_robin(voices, _voice_base(corpus, "emotion_voices"))
        n_test = max(1, int(round(emotion_split[1] * len(voices))))
        n_dev = max(1, int(round(emotion_split[0] * len(voices))))
        if n_dev + n_test >= len(voices):
            raise ValueError(f"need more than {n_dev + n_test} emotion voices for the splits")
        vrole = {v: ("test" if i < n_test else "dev" if i < n_test + n_dev else "train") for i, v in enumerate(order)}
        self.wavs = [_read(corpus["folder"], r) for r in rows]
        self.ids = [os.path.splitext(os.path.basename(r["path"]))[0] for r in rows]
        self.label = np.array([self.classes.index(r["emotion"]) for r in rows], dtype=np.int64)
        self.voice = np.array([r["speaker"] for r in rows])
        self.role = np.array([vrole[r["speaker"]] for r in rows])


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

    def __init__(self, corpus, phone_split=(0.25, 0.25), speaker_split=(4, 28), verify_dev_share=0.25,
                 n_trials=(1000, 2000), emotion_split=(0.25, 0.25)):
        rows = sorted(corpus["probe"], key=lambda r: r["path"])
        folder = corpus["folder"]
        self.phones = phone_inventory(rows)
        self.inventory = {p: i for i, p in enumerate(self.phones)}
        speakers = sorted({r["speaker"] for r in rows})
        n_dev = max(1, int(round(phone_split[0] * len(speakers))))
        n_test = max(1, int(round(phone_split[1] * len(speakers))))
        if n_dev + n_test >= len(speakers):
            raise ValueError(f"need more than {n_dev + n_test} probe voices for the phone splits")
        order = round_robin(speakers, _voice_base(corpus, "probe_speakers"))
        voice_role = {s: ("test" if i < n_test else "dev" if i < n_test + n_dev else "train")
                      for i, s in enumerate(order)}
        self.voice_role = voice_role
        self.wavs, self.labels, self.phone_segments, self.ids = [], [], [], []
        prole = []
        for r in rows:
            wav = _read(folder, r)
            self.wavs.append(wav)
            segs = [tuple(p) for p in r["phones"]]
            self.phone_segments.append(segs)
            self.labels.append(self.labels_at(segs, len(wav), 1))
            self.ids.append(os.path.splitext(os.path.basename(r["path"]))[0])
            prole.append(voice_role[r["speaker"]])
        self.phone_role = np.array(prole)
        self._native_labels = {}
        self.speakers = SpeakerSet(corpus, speaker_split, verify_dev_share, n_trials)
        self.emotion = EmotionSet(corpus, emotion_split)

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
        return batches(self.wavs, batch_size)


def batches(wavs, batch_size):
    """Yields (indices, wavs (B, samples), wav_lens (B,)) over a list of waveforms, in order,
    zero-padded; utterances of similar length go together only as the list orders them."""
    for a in range(0, len(wavs), batch_size):
        idx = list(range(a, min(a + batch_size, len(wavs))))
        n = max(len(wavs[i]) for i in idx)
        w = torch.zeros(len(idx), n)
        for k, i in enumerate(idx):
            w[k, : len(wavs[i])] = torch.from_numpy(wavs[i])
        lens = torch.tensor([len(wavs[i]) / n for i in idx])
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


class Representation:
    """One representation as a function of a batch of waveforms.

    ``kind``: ``fbank`` | ``fbank+-5`` (80 log-Mel with the global normaliser fitted on the
    phone-probe train voices) | ``encoder`` (a pretrained folder ``source``: input embedding + each
    layer) | ``random`` (architecture and normaliser of ``reference``, weights from ``seed``) |
    ``energy`` (frame log-energy alone: the level a probe could read) | ``resemblyzer`` (GE2E
    speaker encoder of the PyPI package, one 256-d embedding per utterance: utterance probes only) |
    ``speaker_ref`` (the self-supervised TDNN speaker reference trained in run folder ``source``:
    each TDNN block at 100 frames/s, then its embedding; ``quality_speaker_ref``).

    ``__call__(wavs, lens)`` -> (list of (B, T, D) layers, (B,) valid frames); ``stack``: fbank
    frames per native frame; ``frames``: False when the representation has no frames (phones n/a);
    ``has_input_proj``: an MGF encoder, whose input projection *before* the positional term
    ``__call__(..., input_proj=True)`` puts first (the diagnostic of where the speaker is lost).
    """

    def __init__(self, data, kind, source=None, reference=None, seed=0, device="cpu"):
        self.kind, self.device, self.stack, self.frames, self.up = kind, device, 1, True, None
        self.has_input_proj = False
        if kind in ("fbank", "fbank+-5"):
            self.fe = FeatureExtractor(n_mels=80, frame_stack=1)
            self.fe.train()  # global statistics from the phone-probe train utterances only
            for i in np.flatnonzero(data.phone_role == "train"):
                self.fe(torch.from_numpy(data.wavs[i])[None], torch.ones(1), epoch=0)
            self.fe.eval()
        elif kind == "energy":
            pass
        elif kind == "resemblyzer":
            from resemblyzer import VoiceEncoder  # optional: the caller checks resemblyzer_available()

            self.frames, self.ve = False, VoiceEncoder(device=device, verbose=False)
        elif kind == "speaker_ref":
            from quality_speaker_ref import SpeakerRefRepresentation

            self.ref = SpeakerRefRepresentation(source, device=device)
        elif kind in ("encoder", "random"):
            if kind == "random":
                torch.manual_seed(seed)
                up = Upstream("random", reference=reference)
            else:
                up = Upstream(source)
            self.up = up.to(device).eval()
            self.stack = self.up.features.frame_stack
            self.has_input_proj = hasattr(self.up.encoder, "_embed")
        else:
            raise ValueError(f"unknown representation kind {kind!r}")

    @torch.no_grad()
    def __call__(self, wavs, lens, input_proj=False):
        if input_proj:  # the input projection (no mask, no positional term), then every layer
            feats, n = self.up.features(wavs.to(self.device), lens.to(self.device), epoch=10**9)
            x, _ = self.up.encoder._embed(feats, n)
            return [h.float().cpu() for h in [x] + self.up.encoder(feats, n)], n.cpu()
        if self.kind in ("fbank", "fbank+-5"):
            h, n = self.fe(wavs, lens, epoch=10**9)
            return [h], n
        if self.kind == "energy":
            return log_energy(wavs, lens)
        if self.kind == "speaker_ref":
            return self.ref(wavs, lens)
        if self.kind == "resemblyzer":
            n_s = (lens * wavs.shape[1]).round().long()
            emb = [torch.from_numpy(self.ve.embed_utterance(wavs[k, : int(n_s[k])].numpy())) for k in range(len(wavs))]
            return [torch.stack(emb)[:, None, :]], torch.ones(len(wavs), dtype=torch.long)
        layers, n = self.up(wavs.to(self.device), lens.to(self.device))
        return [h.float().cpu() for h in layers], n.cpu()


def log_energy(wavs, lens, win=400, hop=HOP):
    """Frame log-energy (dB) of a batch: (B, samples), (B,) relative lengths -> ([(B, T, 1)], (B,)
    valid frames); 25 ms frames every 10 ms. The level alone, for the emotion leak test."""
    frames = torch.nn.functional.pad(wavs, (0, win)).unfold(1, win, hop)[:, : wavs.shape[1] // hop + 1]
    e = 10 * torch.log10(frames.pow(2).mean(-1) + 1e-10)
    n = (lens * wavs.shape[1] / hop).floor().long() + 1
    return [e[:, :, None]], n.clamp(max=e.shape[1])


def resemblyzer_available():
    """True when the optional speaker encoder (PyPI ``resemblyzer``) imports."""
    try:
        import resemblyzer  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def pool(rep, wavs, batch_size=16, input_proj=False):
    """Pooled mean + std of every layer over each utterance -> list of (U, 2 D) (per layer; a
    representation with one vector per utterance, ``rep.frames`` False: that vector, (U, D));
    ``input_proj``: the input projection's first (``rep.has_input_proj`` only)."""
    out = None
    for idx, w, lens in batches(wavs, batch_size):
        layers, n = rep(w, lens, input_proj=True) if input_proj else rep(w, lens)
        if out is None:
            out = [[] for _ in layers]
        for li, h in enumerate(layers):
            out[li].append(pooled_statistics(h, n) if rep.frames else h[:, 0])
    return [torch.cat(p) for p in out]


@torch.no_grad()
def encode(data: ProbeData, kind, source=None, reference=None, seed=0, batch_size=16, device="cpu", rep=None):
    """Every representation of every phone-probe utterance.

    Returns
    -------
    layers : list of Layer
        One per representation (fbank: 1; encoder: input embedding + each layer).
    pooled : list of torch.Tensor
        (U, 2 * D_native) mean + std over each utterance's native frames, one per layer
        (fbank +-5: of the single frames, which context cannot change).
    """
    rep = rep or Representation(data, kind, source=source, reference=reference, seed=seed, device=device)
    stack = rep.stack
    native, pooled = None, None
    for idx, wavs, lens in data.batches(batch_size):
        layers, n = rep(wavs, lens)
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
        (%, frames at 100 fps), ``test_items``: [[correct, frames]] per test utterance, ``test_ids``,
        ``candidates``: every (layer, L2) with its dev and test items, so that one choice can be
        made per variant over all its seeds (:func:`choose_on_pooled_dev`).
    """
    n_classes = len(data.phones)
    dev, best, candidates = [], None, []
    for li, layer in enumerate(frames):
        x, y = _train_frames(layer, data, max_train_frames, seed)
        layer_best = -1.0
        for l2 in l2_grid:
            probe = fit_logistic_regression(x, y, n_classes, l2=l2, class_balanced=False, max_iter=max_iter)
            c = _score_100fps(probe, layer, data, "dev")
            acc = 100.0 * c[:, 0].sum() / c[:, 1].sum()
            candidates.append({"layer": li, "l2": l2, "dev_items": c.tolist(),
                               "test_items": _score_100fps(probe, layer, data, "test").tolist()})
            layer_best = max(layer_best, acc)
            if best is None or acc > best[0]:
                best = (acc, len(candidates) - 1)
        dev.append(layer_best)
    acc, i = best
    items = np.asarray(candidates[i]["test_items"]).reshape(-1, 2)
    return {"dev": dev, "layer": candidates[i]["layer"], "l2": candidates[i]["l2"], "dev_best": acc,
            "dev_items": candidates[i]["dev_items"], "choice": i,
            "test": 100.0 * items[:, 0].sum() / items[:, 1].sum(), "test_items": items.tolist(),
            "test_ids": [data.ids[i] for i in np.flatnonzero(data.phone_role == "test")],
            "candidates": candidates}


def _linear_probe(pooled, y, role, n_classes, l2_grid, max_iter):
    """Linear probe on pooled statistics; layer and L2 chosen on the ``role == "dev"`` items.
    -> (dev accuracy per layer, layer, l2, dev accuracy, dev 0/1 outcomes, test predictions,
    candidates). ``candidates``: every (layer, L2) pair with its dev 0/1 outcomes and test
    predictions, so that the benchmark can choose one pair per variant on the dev items of all its
    seeds together (:func:`choose_on_pooled_dev`) instead of one per run."""
    tr, dv, te = (torch.from_numpy(role == r) for r in ("train", "dev", "test"))
    y = torch.as_tensor(y)
    best, dev_per_layer, candidates = None, [], []
    for li, x in enumerate(pooled):
        layer_best = -1.0
        for l2 in l2_grid:
            probe = fit_logistic_regression(x[tr], y[tr], n_classes, l2=l2, max_iter=max_iter)
            pred = probe.predict(x[dv])
            acc = 100 * accuracy(pred, y[dv])
            layer_best = max(layer_best, acc)
            test_pred = probe.predict(x[te])
            candidates.append({"layer": li, "l2": l2, "dev_items": (pred == y[dv]).long().tolist(),
                               "test_pred": test_pred.tolist()})
            if best is None or acc > best[0]:
                best = (acc, li, l2, test_pred, (pred == y[dv]).long())
        dev_per_layer.append(layer_best)
    acc, li, l2, test_pred, dev_correct = best
    return dev_per_layer, li, l2, acc, dev_correct.tolist(), test_pred, candidates


def choose_on_pooled_dev(runs, key="dev_items", lower_is_better=False):
    """The candidate (layer, L2) with the best dev score summed over several runs (seeds) of one
    variant -> its index in each run's ``candidates``, or None when a run has none.

    One run's dev set (288 utterances for speakers) picks its layer with a standard error of about 3
    points, and a different layer per seed adds that noise to every seed-to-seed difference;
    choosing once per variant on all its seeds' dev items (5x the items) removes most of it, and
    the choice still never looks at test.

    Arguments
    ---------
    runs : list of dict
        One probe result per seed, each with ``candidates`` (same order in every run).
    key : str
        ``dev_items`` (0/1 per dev item, or [correct, frames] per dev utterance: accuracy) or
        ``dev_eer`` (an error rate).
    """
    if not runs or any(not r.get("candidates") for r in runs):
        return None
    n = len(runs[0]["candidates"])
    if any(len(r["candidates"]) != n for r in runs):
        return None
    if key == "dev_items":
        # 0/1 items, or [correct, frames] per utterance (phones: every candidate scores the same frames)
        score = [sum(sum(c[0] if isinstance(c, list) else c for c in r["candidates"][i]["dev_items"])
                     for r in runs) for i in range(n)]
    else:
        score = [-sum(r["candidates"][i][key] for r in runs) for i in range(n)]
    return int(np.argmax(score))  # the first of equals: the lowest layer, the smallest L2, as per run


def speaker_probe(pooled, sset: SpeakerSet, l2_grid=SPEAKER_L2_GRID, max_iter=200):
    """Speaker identification on pooled statistics of the speaker-probe voices; layer and L2
    chosen on dev utterances.

    Returns
    -------
    dict
        ``dev`` (best dev accuracy of each layer over the L2 grid), ``layer``, ``l2``, ``dev_best``,
        ``dev_items`` (1/0 per dev utterance), ``test`` (%), ``test_items`` (1/0 per test
        utterance), ``test_ids``, ``n_test``, ``same_base_errors`` (% of the test errors whose
        predicted voice has the true voice's base voice; chance: the share of the other voices that
        share it).
    """
    y = torch.from_numpy(sset.voice)
    dev, li, l2, acc, dev_items, pred, cands = _linear_probe(pooled, y, sset.role, len(sset.voices), l2_grid,
                                                             max_iter)
    te = sset.role == "test"
    return {"dev": dev, "layer": li, "l2": l2, "dev_best": acc, "dev_items": dev_items,
            **speaker_test_scores(pred, sset), "test_ids": [sset.ids[i] for i in np.flatnonzero(te)],
            "n_test": int(te.sum()), "candidates": cands}


def input_block_probe(data, speakers, kind, source=None, reference=None, seed=0, max_iter=200, device="cpu"):
    """:func:`input_block_speakers` alone, for a probe file written before it (``speakers``: its
    speaker probe; None: not an MGF encoder)."""
    rep = Representation(data, kind, source=source, reference=reference, seed=seed, device=device)
    if not rep.has_input_proj:
        return None
    return input_block_speakers(pool(rep, data.speakers.wavs, input_proj=True)[0], speakers, data.speakers, max_iter)


def input_block_speakers(proj, speakers, sset: SpeakerSet, max_iter=200):
    """SID (%) on test from the pooled input projection and from layer 0 (the input block's output),
    each with its L2 chosen on dev -> {"input_proj": %, "layer0": %}. Layer 0's is read from the
    :func:`speaker_probe` result ``speakers`` of the same representation (its layer-0 candidates:
    the same fits), not fitted again."""
    layer0 = max((c for c in speakers["candidates"] if c["layer"] == 0), key=lambda c: sum(c["dev_items"]))
    return {"input_proj": speaker_probe([proj], sset, max_iter=max_iter)["test"],
            "layer0": speaker_test_scores(layer0["test_pred"], sset)["test"]}


def speaker_test_scores(pred, sset: SpeakerSet):
    """Test predictions (N,) -> ``test`` (%), ``test_items`` (1/0 per test utterance) and
    ``same_base_errors`` (% of the errors whose predicted voice has the true voice's base voice)."""
    yt = sset.voice[sset.role == "test"]
    pred = np.asarray(pred)
    correct = (pred == yt).astype(np.int64)
    wrong = correct == 0
    same = sset.voice_base[pred[wrong]] == sset.voice_base[yt[wrong]]
    return {"test": 100.0 * correct.mean(), "test_items": correct.tolist(),
            "same_base_errors": float(100.0 * same.mean()) if wrong.any() else None}


def cosine_scores(x, pairs, mean, std):
    """Cosine of the z-scored vectors of each pair: (U, D), (N, 2), (D,), (D,) -> (N,) np.ndarray."""
    z = torch.nn.functional.normalize((x - mean) / std, dim=1)
    return (z[pairs[:, 0]] * z[pairs[:, 1]]).sum(1).numpy()


def eer(scores, is_target, weights=None):
    """Equal error rate (%) of (N,) scores for (N,) bool targets, optionally weighted per trial:
    the point of the ROC where the miss rate meets the false-alarm rate (threshold between two
    sorted scores; the mean of the two rates where they cross)."""
    scores = np.asarray(scores, dtype=np.float64)
    t = np.asarray(is_target, dtype=bool)
    w = np.ones_like(scores) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    wt, wn = (w * t)[order], (w * ~t)[order]
    P, N = wt.sum(), wn.sum()
    if P <= 0 or N <= 0:
        return float("nan")
    miss = np.concatenate([[1.0], 1.0 - np.cumsum(wt) / P])  # accept the top k trials, k = 0..N
    fa = np.concatenate([[0.0], np.cumsum(wn) / N])
    k = int(np.argmin(np.abs(miss - fa)))
    return float(50.0 * (miss[k] + fa[k]))


def verification(pooled, sset: SpeakerSet):
    """Zero-shot speaker verification: cosine of z-scored pooled statistics, no trained probe.

    Each layer is z-scored with the mean and std of the dev voices' utterances (unlabelled use);
    the layer is the one with the lowest EER on the dev trials, scored on the test trials (other
    voices). Returns ``dev`` (EER per layer), ``layer``, ``dev_best``, ``test`` (EER %),
    ``test_scores`` (per test trial, for intervals), ``n_trials``, ``n_voices``.
    """
    dev_utts = np.isin(sset.voice, [i for i, v in enumerate(sset.voices) if sset.verify_role[v] == "dev"])
    dev, best, candidates = [], None, []
    pairs, tgt = sset.trials["test"]
    for li, x in enumerate(pooled):
        mean, std = x[dev_utts].mean(0), x[dev_utts].std(0).clamp_min(1e-6)
        e = eer(cosine_scores(x, *sset.trials["dev"][:1], mean, std), sset.trials["dev"][1])
        dev.append(e)
        scores = np.round(cosine_scores(x, pairs, mean, std), 5)
        candidates.append({"layer": li, "dev_eer": e, "test_scores": scores.tolist()})
        if best is None or e < best[0]:
            best = (e, li, scores)
    e, li, scores = best
    return {"dev": dev, "layer": li, "dev_best": e, "test": eer(scores, tgt), "test_scores": scores.tolist(),
            "test_trials": {"voices": sset.voice[pairs].tolist(), "target": tgt.astype(int).tolist()},
            "n_trials": int(len(tgt)), "n_voices": int(len(set(sset.voice[pairs.reshape(-1)].tolist()))),
            "candidates": candidates}


def emotion_probe(pooled, eset: EmotionSet, l2_grid=SPEAKER_L2_GRID, max_iter=200):
    """Emotion classification on pooled statistics, test voices unseen by the probe; layer and L2
    chosen on the dev voices. Returns the keys of :func:`speaker_probe` but ``same_base_errors``."""
    y = torch.from_numpy(eset.label)
    dev, li, l2, acc, dev_items, pred, cands = _linear_probe(pooled, y, eset.role, len(eset.classes), l2_grid,
                                                             max_iter)
    te = eset.role == "test"
    return {"dev": dev, "layer": li, "l2": l2, "dev_best": acc, "dev_items": dev_items,
            **emotion_test_scores(pred, eset), "test_ids": [eset.ids[i] for i in np.flatnonzero(te)],
            "n_test": int(te.sum()), "chance": 100.0 / len(eset.classes), "candidates": cands}


def emotion_test_scores(pred, eset: EmotionSet):
    """Test predictions (N,) -> ``test`` (%) and ``test_items`` (1/0 per test utterance)."""
    correct = (np.asarray(pred) == eset.label[eset.role == "test"]).astype(np.int64)
    return {"test": 100.0 * correct.mean(), "test_items": correct.tolist()}


def run_probes(data, kind, source=None, reference=None, seed=0, max_train_frames=30000, max_iter=200,
               device="cpu", phones=True, utterance=True):
    """Encodes the probe sets with one representation and runs every probe -> dict with
    ``phones`` (None for a representation without frames, or with ``phones=False``: the
    utterance-level probes only), ``speakers`` (identification), ``eer`` (zero-shot verification),
    ``emotion`` (the three None with ``utterance=False``: the phone probe only)."""
    rep = Representation(data, kind, source=source, reference=reference, seed=seed, device=device)
    out = {"phones": None, "n_layers": None, "frame_stack": rep.stack}
    if phones and rep.frames and kind != "energy":
        frames, _ = encode(data, kind, rep=rep)
        out["phones"] = phone_probe(frames, data, seed=seed, max_train_frames=max_train_frames, max_iter=max_iter)
        out["n_layers"] = len(frames)
        del frames
    if not utterance:
        out.update(speakers=None, eer=None, emotion=None)
        return out
    spk = pool(rep, data.speakers.wavs, input_proj=rep.has_input_proj)
    if rep.has_input_proj:
        # diagnostic (issue "Hierarchy in the network", part 5): SID from the input projection, before
        # the positional term, beside layer 0 (after it): how much speaker the input block loses
        proj, spk = spk[0], spk[1:]
    out["speakers"] = speaker_probe(spk, data.speakers, max_iter=max_iter)
    if rep.has_input_proj:
        out["speakers_input_proj"] = input_block_speakers(proj, out["speakers"], data.speakers, max_iter)
    out["eer"] = verification(spk, data.speakers)
    out["emotion"] = emotion_probe(pool(rep, data.emotion.wavs), data.emotion, max_iter=max_iter)
    return out


# ----------------------------------------------------------------------------------------------
# Intervals
# ----------------------------------------------------------------------------------------------
def _as_counts(items):
    """test_items of one probe -> (N, 2) float (correct, total) per test utterance."""
    a = np.asarray(items, dtype=np.float64)
    return a if a.ndim == 2 else np.stack([a, np.ones_like(a)], axis=1)


def paired_bootstrap(a_seeds, b_seeds, n_boot=4000, rng_seed=0, level=0.95, resample="both"):
    """Difference of accuracies A - B (points) with a bootstrap interval.

    Each replicate resamples the test utterances with replacement (the same draw for A and B:
    paired, as both were scored on the same utterances) and, independently for A and for B, the
    pretraining seeds with replacement; an accuracy is the mean over the drawn seeds of
    ``sum(correct) / sum(frames)`` over the drawn utterances. The interval therefore covers both
    the test-set sampling and the seed-to-seed spread. ``resample`` "items" or "seeds" draws only
    that one (the other kept whole): the two parts of the interval, for :func:`seeds_for_half_width`.

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
    if resample not in ("both", "items", "seeds"):
        raise ValueError(f"resample must be both, items or seeds, got {resample!r}")
    n = A.shape[1]
    rng = np.random.default_rng(rng_seed)
    diff = 100.0 * (np.mean(A[:, :, 0].sum(1) / A[:, :, 1].sum(1)) - np.mean(B[:, :, 0].sum(1) / B[:, :, 1].sum(1)))
    out = np.empty(n_boot)
    chunk = 500
    for c0 in range(0, n_boot, chunk):
        m = min(chunk, n_boot - c0)
        if resample == "seeds":
            w = np.ones((m, n))
        else:
            w = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(m)]).astype(np.float64)  # (m, N)

        def acc(X):
            per_seed = (w @ X[:, :, 0].T) / (w @ X[:, :, 1].T)  # (m, S)
            if resample == "items":
                return per_seed.mean(1)
            pick = rng.integers(0, X.shape[0], (m, X.shape[0]))
            return np.take_along_axis(per_seed, pick, axis=1).mean(1)

        out[c0:c0 + m] = 100.0 * (acc(A) - acc(B))
    lo, hi = np.percentile(out, [50 * (1 - level), 50 * (1 + level)])
    return {"diff": float(diff), "low": float(lo), "high": float(hi), "resolved": bool(lo > 0 or hi < 0),
            "n_items": int(n), "n_boot": int(n_boot)}


def seeds_for_half_width(hw_items, hw_seeds, n_seeds, target):
    """Seeds per row that would bring a difference's half-width to ``target``, from its two parts.

    The seeds' part shrinks as 1/sqrt(seeds) and the test items' part does not (the same test set),
    and the two add about in quadrature (hw^2 ~ hw_items^2 + hw_seeds^2), so
    ``n_seeds * hw_seeds^2 / (target^2 - hw_items^2)``, rounded up, at least ``n_seeds``; ``inf``
    where the items' part alone is already ``>= target`` (more test items are needed, not seeds).
    An estimate from one bootstrap, not a promise: the report says so.
    """
    if hw_items >= target:
        return float("inf")
    return max(int(n_seeds), int(np.ceil(n_seeds * hw_seeds ** 2 / (target ** 2 - hw_items ** 2))))


def paired_bootstrap_eer(a_seeds, b_seeds, trials, n_boot=1000, rng_seed=0, level=0.95, resample="both"):
    """Difference of EERs A - B (points) with a bootstrap interval over voices and seeds.

    Each replicate draws the test voices with replacement (the same draw for A and B: both scored
    the same trials) and weighs each trial by how often its voices were drawn (a target trial by
    its voice's count, a non-target trial by the product of its two voices' counts), and draws
    the seeds of A and of B independently with replacement; an EER is the mean over the drawn
    seeds of the weighted EER (:func:`eer`). ``resample`` "items" (voices only) or "seeds" (seeds
    only), as in :func:`paired_bootstrap`.

    Arguments
    ---------
    a_seeds, b_seeds : list
        One list of (N,) trial scores per seed, over the same trials.
    trials : dict
        ``voices``: (N, 2) voice index of each side; ``target``: (N,) 0/1.

    Returns
    -------
    dict
        ``diff`` (mean EER of A minus that of B), ``low``, ``high``, ``resolved``, ``n_items``
        (voices), ``n_trials``, ``n_boot``.
    """
    if resample not in ("both", "items", "seeds"):
        raise ValueError(f"resample must be both, items or seeds, got {resample!r}")
    A, B = np.asarray(a_seeds, dtype=np.float64), np.asarray(b_seeds, dtype=np.float64)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"the two rows were scored on different trials ({A.shape[1]} vs {B.shape[1]})")
    pv = np.asarray(trials["voices"], dtype=np.int64)
    tgt = np.asarray(trials["target"], dtype=bool)
    voices, inv = np.unique(pv, return_inverse=True)
    inv = inv.reshape(pv.shape)
    rng = np.random.default_rng(rng_seed)
    diff = np.mean([eer(x, tgt) for x in A]) - np.mean([eer(x, tgt) for x in B])
    out = np.empty(n_boot)
    for r in range(n_boot):
        if resample == "seeds":
            c = np.ones(len(voices))
        else:
            c = np.bincount(rng.integers(0, len(voices), len(voices)), minlength=len(voices)).astype(np.float64)
        w = np.where(tgt, c[inv[:, 0]], c[inv[:, 0]] * c[inv[:, 1]])
        ka, kb = ((range(len(A)), range(len(B))) if resample == "items" else
                  (rng.integers(0, len(A), len(A)), rng.integers(0, len(B), len(B))))
        ea = np.mean([eer(A[k], tgt, w) for k in ka])
        eb = np.mean([eer(B[k], tgt, w) for k in kb])
        out[r] = ea - eb
    lo, hi = np.nanpercentile(out, [50 * (1 - level), 50 * (1 + level)])
    return {"diff": float(diff), "low": float(lo), "high": float(hi), "resolved": bool(lo > 0 or hi < 0),
            "n_items": int(len(voices)), "n_trials": int(len(tgt)), "n_boot": int(n_boot)}


# ----------------------------------------------------------------------------------------------
# The utterance scale's own embedding (its head, from the run's last checkpoint)
# ----------------------------------------------------------------------------------------------
def utterance_head(run_folder):
    """The utterance scale's head of a finished pretraining run -> (head, layer) or None.

    The export holds the encoder only; the head (optional attentive branch + projection MLP) is in
    the run's last checkpoint (``save/CKPT+*/objectives.ckpt``), built back from the settings the
    run recorded (``run_config.json``). None when the run has no utterance scale (or no checkpoint).
    """
    from mgf_sb.objectives import UtteranceObjective

    try:
        with open(os.path.join(run_folder, "run_config.json")) as f:
            cfg = json.load(f)["settings"]
    except (OSError, ValueError, KeyError):
        return None
    if not cfg.get("use_utterance"):
        return None
    save = os.path.join(run_folder, "save")
    ckpts = sorted(d for d in (os.listdir(save) if os.path.isdir(save) else [])
                   if d.startswith("CKPT+") and os.path.isfile(os.path.join(save, d, "COMPLETE")))
    if not ckpts:
        return None
    head = UtteranceObjective(
        cfg["d_model"], cfg["n_mels"] * cfg["frame_stack"], loss=cfg["utterance_loss"],
        target=cfg["utterance_target"], layer=cfg["utterance_layer"], proj_dim=cfg["proj_dim"],
        temperature=cfg["utterance_temperature"], branch=cfg.get("utterance_branch", "none"),
        pool=cfg.get("utterance_pool", "mean"))
    state = torch.load(os.path.join(save, ckpts[-1], "objectives.ckpt"), map_location="cpu")
    own = {k[len("utterance."):]: v for k, v in state.items() if k.startswith("utterance.") and "queue" not in k}
    head.load_state_dict(own, strict=False)
    missing = [k for k in head.state_dict() if k not in own and "queue" not in k]
    if missing:
        raise RuntimeError(f"{save}/{ckpts[-1]}/objectives.ckpt has no utterance head weights {missing}")
    # "branch": the encoder's last exposed output (its branch's last block; see MGFEncoder.forward)
    layer = -1 if cfg["utterance_layer"] == "branch" else cfg["utterance_layer"]
    return head.eval(), layer


@torch.no_grad()
def head_embeddings(rep, head, layer, wavs, batch_size=16):
    """The utterance head's embedding (after its projection, what its loss compares) of each
    utterance: (U, proj_dim). ``rep``: the run's encoder (:class:`Representation`, kind encoder)."""
    out = []
    for _, w, lens in batches(wavs, batch_size):
        layers, n = rep(w, lens)
        out.append(head.proj(head.pooled(layers[layer], n)))
    return torch.cat(out)


def head_verification(run_folder, snapshot, data, device="cpu"):
    """Zero-shot verification (as :func:`verification`) of the utterance head's embedding of the
    run in ``run_folder`` (encoder: its export ``snapshot``) -> dict, or None without a head."""
    got = utterance_head(run_folder)
    if got is None:
        return None
    head, layer = got
    rep = Representation(data, "encoder", source=snapshot, device=device)
    res = verification([head_embeddings(rep, head, layer, data.speakers.wavs)], data.speakers)
    res.pop("candidates", None)  # one embedding: nothing to choose
    return res
