#!/usr/bin/env python3
"""The speaker reference row of the quality benchmark: a self-supervised TDNN speaker model.

    python benchmarks/quality_speaker_ref.py --pretrain_folder <corpus>/pretrain --out <run folder> \\
        --steps 360 --batch_size 64 --seed 0 --threads 1

An existence proof for the speaker axis (issue "Hierarchy in the network", section "The speaker
axis has an existence proof"): a purpose-built self-supervised speaker objective, trained on the
*same* unlabelled pretraining audio as the MGF variants (``<corpus>/pretrain/train``; never a
probe voice), probed exactly like them. If it verifies the probe voices and MGF's utterance scale
does not, the audio and the budget are not what stops the utterance scale.

- **Model** (:class:`TDNN`): input BatchNorm over raw log-Mel (SpeechBrain ``Fbank``, ``n_mels``
  as ``hparams/mgf.yaml``), 4 TDNN blocks (Conv1d with the x-vector kernels / dilations (5, 1),
  (3, 2), (3, 3), (1, 1), "same" padding so every block keeps the 100 frames/s of the fbank, ReLU,
  BatchNorm), mean + std pooling, a linear 128-d embedding; a 2-layer projection MLP on top for
  the loss only (SimCLR), as usual for NT-Xent.
- **Views**: two random ``crop_seconds`` crops of one utterance, each through its own random
  channel in the log-Mel domain (:func:`mgf_sb.view_channel.random_log_mel_channel`: smooth EQ,
  gain, noise floor), so that "same channel" is never the answer.
- **Loss**: NT-Xent (temperature 0.1) over ``batch_size`` utterances = 2 x ``batch_size`` crops,
  the other utterances' crops the negatives; accuracy = the partner crop ranked first.
- **Runs**: seeded, CPU by default (``--threads``), a checkpoint every ``--ckpt_every`` steps (a
  killed run resumes from it, bit for bit: model, optimiser and sampler state); the finished
  model ``speaker_ref.pt`` holds its settings. A rerun with the same settings reuses it; with
  other settings it refuses (``--on_change=error``) or moves the folder aside and trains again
  (``--on_change=rerun``), so settings never mix.
- **Representation** (:class:`SpeakerRefRepresentation`): per utterance, the output of every
  TDNN block at 100 frames/s (the probes' layers; frames past the valid length are zero after
  every block, so an utterance's features do not depend on its batch) and the embedding as one
  more layer (repeated on every valid frame, so pooled mean + std is the embedding and a
  constant).
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import soundfile as sf
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from mgf_sb.grid import move_aside  # noqa: E402
from mgf_sb.view_channel import random_log_mel_channel  # noqa: E402

REF_ROW = "speaker reference (self-supervised TDNN)"
MODEL_FILE = "speaker_ref.pt"  # the finished model (settings, weights, training summary)
CHECKPOINT_FILE = "checkpoint.pt"  # the last checkpoint of an unfinished run
LOG_FILE = "train_log.jsonl"
SR = 16000
HOP = 160
# x-vector's first four frame layers: (kernel, dilation)
KERNELS = ((5, 1), (3, 2), (3, 3), (1, 1))


class SettingsChanged(RuntimeError):
    """The run folder holds a run made with other settings."""


@dataclasses.dataclass
class RefSettings:
    """Everything that changes what the reference learns (recorded with its checkpoints; a run
    folder with other settings is refused or redone). ``channels``: output channels of the 4
    TDNN blocks; ``noise_floor_db``: (low, high) dB below the crop's level."""

    steps: int = 360
    batch_size: int = 64
    seed: int = 0
    lr: float = 1e-3
    temperature: float = 0.1
    crop_seconds: float = 2.0
    n_mels: int = 80
    channels: tuple = (320, 320, 320, 320)
    emb_dim: int = 128
    proj_dim: int = 128
    n_knots: int = 6
    eq_db: float = 3.0
    gain_db: float = 3.0
    noise_floor_db: tuple = (30.0, 50.0)

    def as_dict(self):
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def make_fbank(n_mels=80):
    """SpeechBrain's Fbank with the front end's settings (mgf_sb.features.FeatureExtractor): 25 ms
    windows every 10 ms, n_fft 512; output 10 log10(power), in dB."""
    from speechbrain.lobes.features import Fbank

    return Fbank(sample_rate=SR, n_mels=n_mels, win_length=25.0, hop_length=10.0, n_fft=512)


def n_fbank_frames(n_samples):
    """Frames of the centred STFT: ``samples // hop + 1`` (as mgf_sb.batch.n_encoder_frames)."""
    return n_samples // HOP + 1


class TDNN(torch.nn.Module):
    """x-vector-style TDNN over log-Mel -> per-block frames and a pooled embedding.

    Arguments
    ---------
    n_mels : int
    channels : tuple of int
        Output channels of the 4 blocks.
    emb_dim, proj_dim : int
        Embedding size; projection-head size (the loss's space).

    Example
    -------
    >>> m = TDNN(40, (16, 16, 16, 32), 8, 8)
    >>> blocks, emb = m(torch.randn(3, 50, 40), torch.tensor([50, 30, 1]))
    >>> [tuple(b.shape) for b in blocks], tuple(emb.shape)
    ([(3, 50, 16), (3, 50, 16), (3, 50, 16), (3, 50, 32)], (3, 8))
    """

    def __init__(self, n_mels=80, channels=(320, 320, 320, 320), emb_dim=128, proj_dim=128):
        super().__init__()
        if len(channels) != len(KERNELS):
            raise ValueError(f"channels must have {len(KERNELS)} entries, got {channels}")
        # learnt input normalisation: log-Mel in dB has a large offset and a bin-dependent scale;
        # a BatchNorm without affine keeps "raw log-Mel" (no per-utterance normalisation, which
        # would erase the level and tilt the speaker partly lives in) while giving unit scale
        self.input_norm = torch.nn.BatchNorm1d(n_mels, affine=False)
        blocks, c_in = [], n_mels
        for c, (k, d) in zip(channels, KERNELS):
            blocks.append(torch.nn.Sequential(
                torch.nn.Conv1d(c_in, c, k, dilation=d, padding=d * (k - 1) // 2),
                torch.nn.ReLU(),
                torch.nn.BatchNorm1d(c),
            ))
            c_in = c
        self.blocks = torch.nn.ModuleList(blocks)
        self.embedding = torch.nn.Linear(2 * c_in, emb_dim)
        self.projection = torch.nn.Sequential(
            torch.nn.Linear(emb_dim, proj_dim), torch.nn.BatchNorm1d(proj_dim), torch.nn.ReLU(),
            torch.nn.Linear(proj_dim, proj_dim))

    def forward(self, feats, n_frames=None):
        """feats (B, T, n_mels) log-Mel dB, n_frames (B,) valid frames -> (list of (B, T, C)
        block outputs, zero past each valid length; (B, emb_dim) embedding)."""
        B, T, _ = feats.shape
        if n_frames is None:
            n_frames = torch.full((B,), T, dtype=torch.long)
        mask = (torch.arange(T, device=feats.device)[None, :] < n_frames.to(feats.device)[:, None])
        m = mask[:, None, :].to(feats.dtype)  # (B, 1, T)
        # zero past the valid length before every conv: the same as the conv's own zero padding, so
        # an utterance gives the same frames alone or padded in a batch (in eval mode)
        x = self.input_norm(feats.transpose(1, 2)) * m  # (B, F, T)
        outs = []
        for block in self.blocks:
            x = block(x) * m
            outs.append(x.transpose(1, 2))
        count = m.sum(-1).clamp(min=1)  # (B, 1)
        mean = x.sum(-1) / count
        var = ((x - mean[..., None]) ** 2 * m).sum(-1) / count
        stats = torch.cat([mean, var.clamp(min=1e-8).sqrt()], dim=1)  # (B, 2C)
        return outs, self.embedding(stats)


def n_parameters(model, head=False):
    """Parameters of the model without the projection head (with it: ``head=True``)."""
    return sum(p.numel() for n, p in model.named_parameters() if head or not n.startswith("projection."))


def nt_xent(z, temperature=0.1):
    """NT-Xent (SimCLR) over 2N views, rows 2i and 2i+1 the two views of one utterance.

    Arguments
    ---------
    z : torch.Tensor
        (2N, D) projections (normalised here).
    temperature : float

    Returns
    -------
    loss : torch.Tensor
        Scalar: cross-entropy of each view against its partner among the 2N - 1 others.
    acc : float
        Share of views whose partner scores highest (chance 1 / (2N - 1)).
    """
    z = torch.nn.functional.normalize(z, dim=1)
    sim = z @ z.t() / temperature  # (2N, 2N)
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.arange(len(z), device=z.device) ^ 1  # 0<->1, 2<->3, ...
    loss = torch.nn.functional.cross_entropy(sim, partner)
    acc = (sim.argmax(1) == partner).float().mean().item()
    return loss, acc


# ----------------------------------------------------------------------------------------------
# Data: the pretraining audio, two crops per utterance, each with its own channel
# ----------------------------------------------------------------------------------------------
def list_audio(folder):
    """Sorted audio files (flac / wav) under ``folder`` -> list of absolute paths."""
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if f.lower().endswith((".flac", ".wav"))]
    return sorted(out)


def data_fingerprint(folder, paths):
    """sha1 of the files' paths relative to ``folder`` and their sizes: the audio a run trained on."""
    h = hashlib.sha1()
    for p in paths:
        h.update(f"{os.path.relpath(p, folder)}:{os.path.getsize(p)}\n".encode())
    return h.hexdigest()[:12]


def load_audio(paths):
    """The files as int16 arrays (exact for 16-bit flac; half the memory of float32)."""
    out = []
    for p in paths:
        wav, sr = sf.read(p, dtype="int16")
        if sr != SR:
            raise ValueError(f"{p}: expected {SR} Hz, got {sr}")
        if wav.ndim > 1:
            wav = wav[:, 0]
        out.append(wav)
    return out


class CropSampler:
    """Batches of two crops per utterance, drawn from one seeded generator (its state is saved with
    each checkpoint, so a resumed run draws what an uninterrupted one would).

    Utterances are visited in a fresh random order every pass over the corpus; each crop starts
    at its own uniform position; an utterance shorter than a crop is repeated to fill it.
    """

    def __init__(self, wavs, batch_size, crop_seconds, seed):
        self.wavs, self.crop = wavs, int(round(crop_seconds * SR))
        self.batch_size = min(batch_size, len(wavs))
        self.gen = torch.Generator().manual_seed(int(seed))
        self.order, self.pos = [], 0

    def _next_utterances(self):
        out = []
        while len(out) < self.batch_size:
            if self.pos >= len(self.order):
                self.order, self.pos = torch.randperm(len(self.wavs), generator=self.gen).tolist(), 0
            i = self.order[self.pos]
            self.pos += 1
            if i not in out:  # not twice in a batch (across a pass boundary): its crops would be false negatives
                out.append(i)
        return out

    def _crop(self, wav):
        n = len(wav)
        if n < self.crop:
            wav = np.tile(wav, math.ceil(self.crop / max(1, n)))
            n = len(wav)
        s = int(torch.randint(0, n - self.crop + 1, (1,), generator=self.gen))
        return torch.from_numpy(wav[s: s + self.crop].astype(np.float32) / 32768.0)

    def next(self):
        """-> (2 B, crop samples) float waveforms, rows 2i and 2i+1 two crops of one utterance."""
        utts = self._next_utterances()
        return torch.stack([self._crop(self.wavs[i]) for i in utts for _ in range(2)])

    def state(self):
        return {"gen": self.gen.get_state(), "order": list(self.order), "pos": self.pos}

    def load_state(self, st):
        self.gen.set_state(st["gen"])
        self.order, self.pos = list(st["order"]), int(st["pos"])


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _save(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _recorded(out):
    """Settings recorded in ``out`` (finished model or checkpoint) -> dict or None."""
    for name in (MODEL_FILE, CHECKPOINT_FILE):
        p = os.path.join(out, name)
        if os.path.isfile(p):
            return torch.load(p, map_location="cpu", weights_only=False)["settings"], name
    return None, None


def _changes(old, new):
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def train(pretrain_folder, out, settings=None, threads=None, device="cpu", on_change="error", log_every=10,
          ckpt_every=25, log=print, max_steps_this_call=None):
    """Trains (or resumes, or reuses) the reference in ``out`` -> the finished model's dict.

    Arguments
    ---------
    pretrain_folder : str
        The corpus's pretraining audio (its ``train`` subfolder is used when present).
    out : str
        Run folder: ``speaker_ref.pt`` (finished), ``checkpoint.pt`` (unfinished), ``train_log.jsonl``.
    settings : RefSettings
    threads : int, optional
        torch threads (None: torch's default).
    on_change : str
        A folder with other settings: ``error`` (raise :class:`SettingsChanged`) or ``rerun``
        (move it to ``<out>.replaced-<time>`` and train again).
    max_steps_this_call : int, optional
        Stop after this many steps, leaving a checkpoint (tests: a "killed" run).

    Returns
    -------
    dict
        ``settings``, ``model`` (state dict), ``steps``, ``cpu_seconds`` (this process's CPU time
        over all calls that trained it), ``loss``/``acc`` (mean of the last ``log_every`` steps),
        ``n_parameters``, ``reused`` (True when nothing was trained).
    """
    settings = settings or RefSettings()
    if threads:
        torch.set_num_threads(int(threads))
    train_dir = os.path.join(pretrain_folder, "train")
    folder = train_dir if os.path.isdir(train_dir) else pretrain_folder
    paths = list_audio(folder)
    if not paths:
        raise FileNotFoundError(f"no audio under {folder}")
    want = {**settings.as_dict(), "data": data_fingerprint(folder, paths), "n_utterances": len(paths)}
    old, name = _recorded(out)
    if old is not None and old != want:
        ch = _changes(old, want)
        if on_change != "rerun":
            raise SettingsChanged(
                f"{out} holds a speaker-reference run with other settings ({name}: "
                + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in ch.items())
                + "). Pass --on_change=rerun to move it aside and train again, or another --out.")
        log(f"[speaker ref] settings changed ({', '.join(ch)}): moved {out} to {move_aside(out)}")
        old = None
    model_path, ckpt_path = os.path.join(out, MODEL_FILE), os.path.join(out, CHECKPOINT_FILE)
    if old is not None and name == MODEL_FILE:
        res = torch.load(model_path, map_location="cpu", weights_only=False)
        log(f"[speaker ref] {out}: finished run reused ({res['steps']} steps, {res['cpu_seconds']:.0f} CPU s)")
        return {**res, "reused": True}
    os.makedirs(out, exist_ok=True)

    torch.manual_seed(settings.seed)
    model = TDNN(settings.n_mels, tuple(settings.channels), settings.emb_dim, settings.proj_dim).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    wavs = load_audio(paths)
    sampler = CropSampler(wavs, settings.batch_size, settings.crop_seconds, settings.seed)
    if sampler.batch_size < settings.batch_size:
        log(f"[speaker ref] only {len(wavs)} utterances: batches of {sampler.batch_size}, not {settings.batch_size}")
    # the channels draw from their own generator, so the crops are the same whatever the channel settings
    chan_gen = torch.Generator().manual_seed(int(settings.seed) + 7919)
    fbank = make_fbank(settings.n_mels).to(device)
    step, cpu, history = 0, 0.0, []
    if os.path.isfile(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sampler.load_state(ck["sampler"])
        chan_gen.set_state(ck["channel_gen"])
        torch.set_rng_state(ck["torch_rng"])
        step, cpu, history = ck["step"], ck["cpu_seconds"], ck["history"]
        log(f"[speaker ref] resuming {out} at step {step}/{settings.steps}")
    else:
        log(f"[speaker ref] training {out}: {settings.steps} steps of {sampler.batch_size} utterances x 2 crops of "
            f"{settings.crop_seconds} s, {len(wavs)} utterances ({folder}), TDNN {n_parameters(model):,} parameters "
            f"(+{n_parameters(model, True) - n_parameters(model):,} in the projection head), "
            f"{torch.get_num_threads()} thread(s)")

    def checkpoint():
        _save({"settings": want, "model": model.state_dict(), "optimizer": opt.state_dict(),
               "sampler": sampler.state(), "channel_gen": chan_gen.get_state(), "torch_rng": torch.get_rng_state(),
               "step": step, "cpu_seconds": cpu, "history": history}, ckpt_path)

    model.train()
    ran, t_wall = 0, time.time()
    with open(os.path.join(out, LOG_FILE), "a") as logf:
        while step < settings.steps:
            if max_steps_this_call is not None and ran >= max_steps_this_call:
                checkpoint()
                return None
            c0 = time.process_time()
            wav = sampler.next().to(device)
            with torch.no_grad():
                feats = fbank(wav)  # (2B, T, n_mels), dB
                # each crop its own channel: the two views of an utterance never share one
                feats = random_log_mel_channel(feats, settings.n_knots, settings.eq_db, settings.gain_db,
                                               tuple(settings.noise_floor_db), generator=chan_gen)
            _, emb = model(feats)
            loss, acc = nt_xent(model.projection(emb), settings.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            ran += 1
            cpu += time.process_time() - c0
            history.append([round(loss.item(), 5), round(acc, 5)])
            if step % log_every == 0 or step == settings.steps:
                recent = np.array(history[-log_every:])
                rec = {"step": step, "loss": float(recent[:, 0].mean()), "acc": float(recent[:, 1].mean()),
                       "chance": 1.0 / (2 * sampler.batch_size - 1), "cpu_seconds": round(cpu, 2),
                       "cpu_seconds_per_step": round(cpu / step, 4)}
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                log(f"[speaker ref] step {step}/{settings.steps}: NT-Xent {rec['loss']:.3f}, partner top-1 "
                    f"{rec['acc']:.3f} (chance {rec['chance']:.3f}), {rec['cpu_seconds_per_step']:.2f} CPU s/step, "
                    f"{time.time() - t_wall:.0f} s")
            if step % ckpt_every == 0 and step < settings.steps:
                checkpoint()
    recent = np.array(history[-log_every:])
    res = {"settings": want, "model": {k: v.cpu() for k, v in model.state_dict().items()}, "steps": step,
           "cpu_seconds": cpu, "loss": float(recent[:, 0].mean()), "acc": float(recent[:, 1].mean()),
           "history": history, "n_parameters": n_parameters(model), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    _save(res, model_path)
    if os.path.isfile(ckpt_path):
        os.remove(ckpt_path)
    log(f"[speaker ref] {out}: done, {step} steps, {cpu:.0f} CPU s ({cpu / max(1, step):.2f} s/step)")
    return {**res, "reused": False}


def random_init(pretrain_folder, out, settings=None, calibration_batches=20, log=print):
    """The reference's own random-init row: the TDNN with the weights its training starts from (same
    seed), nothing trained, its BatchNorm statistics calibrated on ``calibration_batches`` crop batches
    of the pretraining audio (as the random-init MGF encoder keeps a normaliser fitted to the corpus),
    written as a finished model (``steps`` 0, ``random_init`` True) that the probes read as any other.
    It says how much of the reference's speaker skill its training adds over its architecture."""
    settings = settings or RefSettings()
    train_dir = os.path.join(pretrain_folder, "train")
    folder = train_dir if os.path.isdir(train_dir) else pretrain_folder
    paths = list_audio(folder)
    torch.manual_seed(settings.seed)
    model = TDNN(settings.n_mels, tuple(settings.channels), settings.emb_dim, settings.proj_dim)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.momentum = None  # a cumulative average over the calibration batches
    sampler = CropSampler(load_audio(paths), settings.batch_size, settings.crop_seconds, settings.seed)
    chan_gen = torch.Generator().manual_seed(int(settings.seed) + 7919)
    fbank = make_fbank(settings.n_mels)
    model.train()
    with torch.no_grad():
        for _ in range(int(calibration_batches)):
            feats = random_log_mel_channel(fbank(sampler.next()), settings.n_knots, settings.eq_db, settings.gain_db,
                                           tuple(settings.noise_floor_db), generator=chan_gen)
            model(feats)
    want = {**settings.as_dict(), "data": data_fingerprint(folder, paths), "n_utterances": len(paths)}
    os.makedirs(out, exist_ok=True)
    res = {"settings": want, "model": model.state_dict(), "steps": 0, "cpu_seconds": 0.0, "random_init": True,
           "calibration_batches": int(calibration_batches), "n_parameters": n_parameters(model),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    _save(res, os.path.join(out, MODEL_FILE))
    log(f"[speaker ref] {out}: random init (seed {settings.seed}), BatchNorm calibrated on {calibration_batches} batches")
    return res


def finished_model(out):
    """The finished model's dict in run folder ``out``; raises FileNotFoundError when unfinished."""
    path = os.path.join(out, MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{out}: no finished speaker reference ({MODEL_FILE})")
    return torch.load(path, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------------------------
# The representation the probes use
# ----------------------------------------------------------------------------------------------
class SpeakerRefRepresentation:
    """A finished reference as a probe representation (``quality_probe.Representation`` kind
    ``speaker_ref``).

    ``__call__(wavs (B, samples), lens (B,) relative)`` -> (list of (B, T, D) layers, (B,) valid
    frames), T the fbank frames (100 frames/s: ``stack`` 1): the 4 TDNN blocks (D = channels),
    then the embedding repeated on every valid frame (D = emb_dim; its pooled mean is the
    embedding, its std a constant).
    """

    stack = 1

    def __init__(self, source, device="cpu"):
        res = finished_model(source)
        s = res["settings"]
        self.model = TDNN(s["n_mels"], tuple(s["channels"]), s["emb_dim"], s["proj_dim"])
        self.model.load_state_dict(res["model"])
        self.model.to(device).eval()
        self.fbank = make_fbank(s["n_mels"]).to(device)
        self.device = device
        self.n_layers = len(KERNELS) + 1

    @torch.no_grad()
    def __call__(self, wavs, lens):
        wavs = wavs.to(self.device)
        feats = self.fbank(wavs)
        n_samples = torch.round(lens.float() * wavs.shape[1]).long()
        n = n_fbank_frames(n_samples).clamp(max=feats.shape[1]).to(self.device)
        blocks, emb = self.model(feats, n)
        valid = (torch.arange(feats.shape[1], device=self.device)[None, :] < n[:, None]).to(emb.dtype)
        layers = blocks + [emb[:, None, :] * valid[..., None]]
        return [h.float().cpu() for h in layers], n.cpu()


# ----------------------------------------------------------------------------------------------
# Command line (the benchmark runs this as a grid step)
# ----------------------------------------------------------------------------------------------
def settings_args(settings):
    """RefSettings -> command-line arguments of this script."""
    out = []
    for k, v in settings.as_dict().items():
        out += [f"--{k}"] + ([str(x) for x in v] if isinstance(v, list) else [str(v)])
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrain_folder", required=True, help="the corpus's pretraining audio (its train/ is used)")
    p.add_argument("--out", required=True, help="run folder")
    d = RefSettings()
    for f in dataclasses.fields(RefSettings):
        v = getattr(d, f.name)
        if isinstance(v, tuple):
            p.add_argument(f"--{f.name}", type=type(v[0]), nargs=len(v), default=list(v))
        else:
            p.add_argument(f"--{f.name}", type=type(v), default=v)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--on_change", default="error", choices=["error", "rerun"],
                   help="a run folder made with other settings: stop (error) or move it aside and train again")
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--ckpt_every", type=int, default=25)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = RefSettings(**{f.name: (tuple(getattr(args, f.name)) if isinstance(getattr(args, f.name), list)
                                       else getattr(args, f.name)) for f in dataclasses.fields(RefSettings)})
    try:
        res = train(args.pretrain_folder, args.out, settings, threads=args.threads, device=args.device,
                    on_change=args.on_change, log_every=args.log_every, ckpt_every=args.ckpt_every,
                    log=lambda m: print(m, flush=True))
    except SettingsChanged as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if res is not None else 1


if __name__ == "__main__":
    sys.exit(main())
