"""Use a trained mgf-sb model in three lines, as any SpeechBrain model::

    from mgf_sb.inference import MGFEncoder
    enc = MGFEncoder.from_hparams(source="path/to/exported_model")
    layers = enc.encode_file("speech.wav")      # (num_layers, T, D); or encode_batch(wavs, wav_lens)

    from mgf_sb.inference import MGFEmotionClassifier
    clf = MGFEmotionClassifier.from_hparams(source="path/to/exported_emotion_model")
    label, score, probs = clf.classify_file("speech.wav")

The model folder is written by ``python -m mgf_sb.export`` (see
:mod:`mgf_sb.export`) from a pretraining output folder or a downstream
classifier folder::

    <model>/
      hyperparams.yaml     modules (FeatureExtractor, MGFEncoder, heads) + Pretrainer
      mgf_config.json      the pretrained-folder config (so <model> is also a valid
                           `upstream:` folder for the downstream recipes)
      features.ckpt        FeatureExtractor state_dict (incl. normaliser statistics)
      encoder.ckpt         MGFEncoder state_dict (absent for the fbank baseline)
      layer_selector.ckpt  classifier folders only: LayerSelector state_dict
      classifier.ckpt      classifier folders only: UtteranceClassifier state_dict
      label_encoder.txt    classifier folders only: SpeechBrain CategoricalEncoder

Loading is local only: ``source`` must be an existing folder; nothing is ever
fetched from the network (no HuggingFace hub, no URL), and a missing or
incomplete folder raises an error naming what is missing. Weights load with
``torch.load(..., weights_only=True)`` and strict key matching (SpeechBrain's
default Pretrainer hook is non-strict and only warns on mismatches); NaN/Inf
weights are refused, naming the tensor. ``hyperparams.yaml`` is read as UTF-8 and
checked before HyperPyYAML evaluates it (:func:`check_hparams_safe`): a folder
whose YAML could run code is refused with the line, unless
``from_hparams(..., trust_code=True)``.
"""

import logging
import math
import os
import pathlib

import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio import audio_io
from speechbrain.inference.interfaces import Pretrained
from speechbrain.utils.fetching import FetchConfig, FetchFrom, FetchSource, LocalStrategy, link_with_strategy

from mgf_sb.batch import n_encoder_frames
from mgf_sb.pretrained_folder import check_finite
from mgf_sb.data.audio import MIN_AUDIO_SECONDS

logger = logging.getLogger(__name__)

HPARAMS_FILE = "hyperparams.yaml"
MODEL_HEADER = "# mgf-sb model folder"  # first line of an exported hyperparams.yaml
# the YAML safety check (and EXPORT_HINT) live in mgf_sb.safe_yaml; re-exported here for callers
from mgf_sb.safe_yaml import (EXPORT_HINT, SAFE_CLASS_MODULES, SAFE_FUNCTION_MODULES, UnsafeModelFolder,  # noqa: E402,F401
                              check_hparams_safe, read_hparams_text)

# Never touch the network: local sources are linked/copied, anything else is refused.
# overwrite=True re-links every file, so a reused `savedir` never serves stale files.
LOCAL_ONLY = FetchConfig(allow_network=False, overwrite=True)


# ----------------------------------------------------------------------------------------------
# Pretrainer hooks (named in the exported hyperparams.yaml)
# ----------------------------------------------------------------------------------------------
def load_state_dict_strict(obj, path):
    """Pretrainer hook: ``torch.load(weights_only=True)`` + strict ``load_state_dict``."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path!r} is missing. {EXPORT_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or pickled-code file
        raise ValueError(f"cannot load weights from {path!r}: {e}. {EXPORT_HINT}") from e
    check_finite(state, path)  # NaN/Inf weights would make every output NaN
    try:
        obj.load_state_dict(state, strict=True)
    except Exception as e:
        raise ValueError(
            f"weights in {path!r} do not match the architecture in {HPARAMS_FILE}: {e}. {EXPORT_HINT}"
        ) from e


def load_label_encoder(obj, path):
    """Pretrainer hook for the CategoricalEncoder (its default hook silently skips a missing file)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label encoder {path!r} is missing. {EXPORT_HINT}")
    obj.load(path)
    obj.ignore_len()


# ----------------------------------------------------------------------------------------------
# Folder checks and audio reading
# ----------------------------------------------------------------------------------------------
def check_model_folder(source):
    """Absolute path of a local model folder, or a clear error (never a network attempt)."""
    if isinstance(source, FetchSource):
        if source.FetchFrom != FetchFrom.LOCAL:
            raise ValueError(f"mgf-sb models load from local folders only, got {source!r}")
        source = source.path
    source = str(source)
    if source.startswith(("http://", "https://")):
        raise ValueError(
            f"mgf-sb models load from local folders only (no download), got the URL {source!r}: "
            f"download the folder first and pass its path."
        )
    folder = os.path.abspath(os.path.expanduser(source))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"model folder {folder!r} does not exist (mgf-sb loads local folders only, nothing is "
            f"downloaded). Export a trained model first: python -m mgf_sb.export <trained folder> {source}"
        )
    if not os.path.isfile(os.path.join(folder, HPARAMS_FILE)):
        present = ", ".join(sorted(os.listdir(folder))) or "nothing"
        raise FileNotFoundError(
            f"model folder {folder!r} is incomplete: missing {HPARAMS_FILE} (it holds {present}). "
            f"A pretraining or downstream output folder is not a model folder yet. {EXPORT_HINT}"
        )
    # A recipe's output folder also holds a hyperparams.yaml (the training one): do not run it.
    training_marks = [m for m in ("pretrained", "save", "model", "train_log.txt") if os.path.exists(os.path.join(folder, m))]
    exported = read_hparams_text(os.path.join(folder, HPARAMS_FILE)).startswith(MODEL_HEADER)
    if training_marks and not exported:
        raise ValueError(
            f"{folder!r} is a training output folder (it holds {', '.join(training_marks)}), not a model "
            f"folder: its hyperparams.yaml is the training configuration. {EXPORT_HINT}"
        )
    return folder


def read_audio_file(path, sample_rate=16000, min_samples=int(MIN_AUDIO_SECONDS * 16000)):
    """Any rate / channel count -> mono float waveform at ``sample_rate`` (1-D tensor).

    Reads through SpeechBrain's soundfile-based ``audio_io`` (WAV, FLAC, OGG...), averages
    channels, resamples with SpeechBrain's ``AudioNormalizer``. Clear errors for missing,
    empty, unreadable or too-short files.
    """
    from speechbrain.dataio.preprocess import AudioNormalizer

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"audio file {path!r} is empty (0 bytes)")
    try:
        signal, sr = audio_io.load(path, channels_first=False)  # (time, channels)
    except Exception as e:
        cause = e.__cause__ or e
        raise ValueError(
            f"cannot read {path!r} as audio ({cause}). Readable formats: WAV, FLAC, OGG (soundfile); "
            f"convert others first, e.g. `ffmpeg -i {os.path.basename(path)} -ac 1 -ar {sample_rate} out.wav`"
        ) from e
    if signal.ndim == 2:
        signal = signal.mean(1)
    if signal.numel() == 0:
        raise ValueError(f"audio file {path!r} contains no samples")
    if not torch.isfinite(signal).all():  # would make every output NaN
        raise ValueError(f"audio file {path!r} has NaN or Inf samples (a corrupted float WAV?)")
    if sr != sample_rate:
        signal = AudioNormalizer(sample_rate=sample_rate)(signal, sr)
    if signal.numel() < min_samples:
        raise ValueError(
            f"audio file {path!r} is too short ({signal.numel() / sample_rate * 1000:.1f} ms); "
            f"the model needs at least {min_samples / sample_rate * 1000:.0f} ms"
        )
    return signal.float()


# ----------------------------------------------------------------------------------------------
# The interfaces
# ----------------------------------------------------------------------------------------------
class _MGFPretrained(Pretrained):
    """Shared loading (local only, strict) and encoding (whole or chunked)."""

    MODULES_NEEDED = ["features"]
    HPARAMS_NEEDED = ["sample_rate"]

    @classmethod
    def from_hparams(
        cls,
        source,
        hparams_file=HPARAMS_FILE,
        savedir=None,
        overrides=None,
        local_strategy=LocalStrategy.SYMLINK,
        trust_code=False,
        **kwargs,
    ):
        """Loads an exported model folder (local only; see the module docstring).

        Arguments
        ---------
        source : str or Path
            The model folder written by ``python -m mgf_sb.export``.
        hparams_file : str
        savedir : str, optional
            If given, the model files are symlinked (or copied, with
            ``local_strategy=LocalStrategy.COPY``) there, as SpeechBrain does;
            by default they are read in place.
        overrides : dict, optional
            HyperPyYAML overrides, e.g. ``{"chunk_seconds": 10}``.
        trust_code : bool
            False (default): ``hyperparams.yaml`` is checked before it is evaluated and
            refused if it could run code (:func:`check_hparams_safe`). True: load it as
            SpeechBrain does, running whatever it says (only for folders you trust).
        **kwargs
            Forwarded to the class (``run_opts={"device": "cuda"}``, ``freeze_params``).
        """
        for unsupported in ("fetch_config", "download_only"):
            if kwargs.pop(unsupported, None):
                raise ValueError(f"{unsupported} is not supported: mgf-sb loads local folders only")
        folder = check_model_folder(source)
        local = FetchSource(FetchFrom.LOCAL, folder)
        hparams_path = os.path.join(folder, hparams_file)
        if not os.path.isfile(hparams_path):
            raise FileNotFoundError(f"model folder {folder!r} is incomplete: missing {hparams_file}. {EXPORT_HINT}")
        overrides = dict(overrides or {})
        overrides.setdefault("pretrained_path", folder)
        text = read_hparams_text(hparams_path)
        if not trust_code:
            check_hparams_safe(text, hparams_path)
        hparams = load_hyperpyyaml(text, overrides)
        cls._check_hparams(hparams, folder)

        pretrainer = hparams["pretrainer"]
        missing = []
        for name in pretrainer.loadables:
            path = pretrainer.paths.get(name, os.path.join(folder, name + ".ckpt"))
            if not os.path.isfile(str(path)):
                missing.append(os.path.basename(str(path)))
        if missing:
            raise FileNotFoundError(
                f"model folder {folder!r} is incomplete: missing {', '.join(missing)}. {EXPORT_HINT}"
            )
        if savedir is not None:  # as SpeechBrain does: the config next to the linked/copied weights
            savedir = os.path.abspath(str(savedir))
            os.makedirs(savedir, exist_ok=True)
            link_with_strategy(pathlib.Path(hparams_path), pathlib.Path(savedir) / hparams_file, local_strategy)
        hparams["savedir"] = savedir
        pretrainer.set_collect_in(savedir)
        pretrainer.collect_files(default_source=local, local_strategy=local_strategy, fetch_config=LOCAL_ONLY)
        pretrainer.load_collected()
        model = cls(modules=hparams["modules"], hparams=hparams, **kwargs)
        try:
            model._chunk_sizes(None, None)  # chunk_seconds / overlap_seconds of the file or overrides
        except ValueError as e:
            raise ValueError(f"{hparams_path}: {e}") from None
        return model

    @classmethod
    def _check_hparams(cls, hparams, folder):
        path = os.path.join(folder, HPARAMS_FILE)
        for key in ("modules", "pretrainer"):
            if key not in hparams:
                raise ValueError(f"{path} has no '{key}'. {EXPORT_HINT}")
        for key in cls.MODULES_NEEDED:
            if key not in hparams["modules"]:
                raise ValueError(
                    f"{path} defines no '{key}' module: {cls.__name__} cannot use this "
                    f"{hparams.get('model_type', 'unknown')} folder ({cls._folder_hint()})."
                )
        for key in cls.HPARAMS_NEEDED:
            if key not in hparams:
                raise ValueError(f"{path} has no '{key}'. {EXPORT_HINT}")

    @classmethod
    def _folder_hint(cls):
        return "expected a folder exported by mgf_sb.export"

    # -- properties ------------------------------------------------------------------------------
    @property
    def has_encoder(self):
        return "encoder" in self.mods

    @property
    def num_layers(self):
        """Representations returned for ``layer=None`` (input embedding + each layer + each
        utterance-branch block; 1 for fbank)."""
        return self.mods.encoder.num_outputs if self.has_encoder else 1

    @property
    def frame_rate(self):
        return self.mods.features.frame_rate

    def n_frames(self, wavs, wav_lens):
        """(B,) valid output frames for a padded batch."""
        return self.mods.features.n_frames(wavs, wav_lens)

    # -- encoding ------------------------------------------------------------------------------
    def _all_layers(self, wavs, wav_lens):
        """(B, samples), (B,) -> list of (B, T, D), (B,) frames; no chunking."""
        wavs = wavs.to(self.device).float()
        wav_lens = wav_lens.to(self.device).float()
        with torch.no_grad():
            feats, n_frames = self.mods.features(wavs, wav_lens, epoch=10**9)
            if not self.has_encoder:
                return [feats], n_frames
            return list(self.mods.encoder(feats, n_frames)), n_frames

    def _chunk_sizes(self, chunk_seconds, overlap_seconds):
        """Chunk and overlap in samples, both multiples of one output frame's hop."""
        fe = self.mods.features
        step = fe.hop * fe.frame_stack
        sr = self.hparams.sample_rate
        if chunk_seconds is None:
            chunk_seconds = getattr(self.hparams, "chunk_seconds", 30.0)
        if overlap_seconds is None:
            overlap_seconds = getattr(self.hparams, "overlap_seconds", 4.0)
        try:
            chunk_seconds, overlap_seconds = float(chunk_seconds), float(overlap_seconds)
        except (TypeError, ValueError):
            raise ValueError(f"chunk_seconds and overlap_seconds must be numbers, got {chunk_seconds!r}, "
                             f"{overlap_seconds!r}") from None
        if not (math.isfinite(chunk_seconds) and math.isfinite(overlap_seconds)):
            raise ValueError(f"chunk_seconds and overlap_seconds must be finite, got {chunk_seconds}, {overlap_seconds}")
        minimum = self.min_chunk_seconds
        if chunk_seconds < minimum:
            raise ValueError(
                f"chunk_seconds={chunk_seconds} is shorter than the model's receptive field "
                f"({minimum:.3f} s: the positional convolution's span, at least {MIN_AUDIO_SECONDS} s)"
            )
        chunk = int(round(chunk_seconds * sr / step)) * step
        overlap = int(round(overlap_seconds * sr / step)) * step
        if chunk <= 0 or overlap < 0 or overlap >= chunk:
            raise ValueError(
                f"need 0 <= overlap_seconds < chunk_seconds, got chunk_seconds={chunk_seconds}, "
                f"overlap_seconds={overlap_seconds}"
            )
        return chunk, overlap, step

    @property
    def min_chunk_seconds(self):
        """Shortest allowed chunk: the encoder's receptive field beyond attention (its positional
        convolution spans ``conv_pos_kernel`` frames), and never under :data:`MIN_AUDIO_SECONDS`."""
        fe = self.mods.features
        frame_s = fe.hop * fe.frame_stack / self.hparams.sample_rate
        kernel = getattr(self.mods.encoder, "config", {}).get("conv_pos_kernel", 1) if self.has_encoder else 1
        return max(MIN_AUDIO_SECONDS, kernel * frame_s)

    def _encode_waveform(self, wav, chunk_seconds=None, overlap_seconds=None):
        """One 1-D waveform -> (num_layers, T, D), in overlapping chunks if longer than a chunk.

        Each chunk keeps its centre: consecutive chunks overlap by ``overlap`` and the boundary
        is the middle of the overlap, so every kept frame has at least ``overlap / 2`` of
        context on both sides (except at the file's ends). Memory is bounded by the chunk
        (plus the (num_layers, T, D) output itself).
        """
        wav = wav.reshape(-1)
        n = wav.shape[0]
        chunk, overlap, step = self._chunk_sizes(chunk_seconds, overlap_seconds)
        if n <= chunk:
            layers, _ = self._all_layers(wav[None], torch.ones(1))
            return torch.stack([h[0] for h in layers])
        fe = self.mods.features
        total = int(n_encoder_frames(n, fe.hop, fe.frame_stack))
        stride_f, half_f = (chunk - overlap) // step, (overlap // step) // 2
        out = None
        start, first = 0, 0  # sample offset of this chunk; first global frame still to fill
        while True:
            end = min(start + chunk, n)
            last = end >= n
            layers, _ = self._all_layers(wav[None, start:end], torch.ones(1))
            local = torch.stack([h[0] for h in layers])  # (L, t, D)
            if out is None:
                out = local.new_zeros(local.shape[0], total, local.shape[2])
            offset = start // step
            keep_to = local.shape[1] if last else stride_f + half_f
            keep_from = first - offset
            out[:, first : offset + keep_to] = local[:, keep_from:keep_to]
            first = offset + keep_to
            if last:
                break
            start += chunk - overlap
        if first != total:  # the stitching arithmetic is exact; this guards against regressions
            raise RuntimeError(f"chunked encoding filled {first} of {total} frames")
        return out

    def encode_batch(self, wavs, wav_lens=None, layer="default", return_lengths=False):
        """Encodes a batch of 16 kHz waveforms (no chunking; see :meth:`encode_file`).

        Arguments
        ---------
        wavs : torch.Tensor
            (B, samples) or (samples,) zero-padded waveforms at ``sample_rate``.
        wav_lens : torch.Tensor, optional
            (B,) relative lengths (default: all 1).
        layer : int or None
            An index into the representations (0 = input embedding, -1 = last layer), or
            None for all of them; default: ``layer`` in hyperparams.yaml (null = all).
        return_lengths : bool
            Also return the (B,) valid frames.

        Returns
        -------
        torch.Tensor
            (num_layers, B, T, D) for all layers, (B, T, D) for one.
        """
        if wavs.ndim == 1:
            wavs = wavs[None]
        if wav_lens is None:
            wav_lens = torch.ones(wavs.shape[0])
        layer = self._resolve_layer(layer)
        layers, n_frames = self._all_layers(wavs, wav_lens)
        out = torch.stack(layers) if layer is None else layers[layer]
        return (out, n_frames) if return_lengths else out

    def forward(self, wavs, wav_lens=None):
        return self.encode_batch(wavs, wav_lens)

    def _resolve_layer(self, layer):
        if layer == "default":
            layer = getattr(self.hparams, "layer", None)
        if layer is not None and not -self.num_layers <= int(layer) < self.num_layers:
            raise ValueError(f"layer {layer} out of range: this model has {self.num_layers} representations")
        return layer

    def load_waveform(self, path):
        """Reads any rate / channel count as a mono waveform at the model's rate."""
        fe = self.mods.features
        sr = self.hparams.sample_rate
        return read_audio_file(path, sr, min_samples=max(int(round(MIN_AUDIO_SECONDS * sr)), fe.hop * fe.frame_stack))

    def encode_file(self, path, layer="default", chunk_seconds=None, overlap_seconds=None):
        """Encodes an audio file (any rate / channels; long files in overlapping chunks).

        Arguments
        ---------
        path : str
        layer : int or None
            As in :meth:`encode_batch`.
        chunk_seconds, overlap_seconds : float, optional
            Default: ``chunk_seconds`` / ``overlap_seconds`` in hyperparams.yaml.

        Returns
        -------
        torch.Tensor
            (num_layers, T, D) for all layers, (T, D) for one; T = frames at ``frame_rate``.
        """
        layer = self._resolve_layer(layer)
        out = self._encode_waveform(self.load_waveform(path), chunk_seconds, overlap_seconds)
        return out if layer is None else out[layer]


class MGFEncoder(_MGFPretrained):
    """A pretrained MGF encoder: waveforms -> every layer's representation.

    Example
    -------
    >>> enc = MGFEncoder.from_hparams(source="models/mgf")   # doctest: +SKIP
    >>> layers = enc.encode_file("speech.wav")               # doctest: +SKIP
    >>> last = enc.encode_batch(wavs, wav_lens, layer=-1)    # doctest: +SKIP
    """


class MGFClassifier(_MGFPretrained):
    """An utterance classifier trained by a downstream recipe on top of an MGF upstream.

    Returns, as SpeechBrain's ``EncoderClassifier`` does, per-class probabilities,
    the best score, its index and its label.
    """

    MODULES_NEEDED = ["features", "layer_selector", "classifier"]
    HPARAMS_NEEDED = ["sample_rate", "label_encoder"]
    TASK = None

    @classmethod
    def _folder_hint(cls):
        return "use MGFEncoder for it, or export a downstream classifier folder (<output_folder>/model)"

    @classmethod
    def _check_hparams(cls, hparams, folder):
        super()._check_hparams(hparams, folder)
        task = hparams.get("task")
        if cls.TASK is not None and task != cls.TASK:
            raise ValueError(
                f"{folder!r} holds a {task!r} classifier, not {cls.TASK!r}: load it with MGFClassifier"
            )

    @property
    def labels(self):
        enc = self.hparams.label_encoder
        return [enc.ind2lab[i] for i in range(len(enc.ind2lab))]

    def _classify_layers(self, layers, n_frames):
        with torch.no_grad():
            x = self.mods.layer_selector(layers)
            logits = self.mods.classifier(x, n_frames.to(x.device))
        return torch.softmax(logits, dim=-1)

    def _decide(self, probs):
        score, index = probs.max(dim=-1)
        labels = [self.hparams.label_encoder.ind2lab[int(i)] for i in index]
        return probs, score, index, labels

    def classify_batch(self, wavs, wav_lens=None):
        """(B, samples) 16 kHz waveforms -> (probs (B, C), score (B,), index (B,), labels list)."""
        if wavs.ndim == 1:
            wavs = wavs[None]
        if wav_lens is None:
            wav_lens = torch.ones(wavs.shape[0])
        layers, n_frames = self._all_layers(wavs, wav_lens)
        return self._decide(self._classify_layers(layers, n_frames))

    def forward(self, wavs, wav_lens=None):
        return self.classify_batch(wavs, wav_lens)

    def classify_file(self, path, chunk_seconds=None, overlap_seconds=None):
        """Classifies a file (any rate / channels; long files encoded in chunks, pooled whole).

        Returns
        -------
        label : str
        score : float
            The label's probability.
        probs : dict
            Every class's probability, in label order.
        """
        out = self._encode_waveform(self.load_waveform(path), chunk_seconds, overlap_seconds)
        layers = [h[None] for h in out]
        probs = self._classify_layers(layers, torch.tensor([out.shape[1]]))
        probs, score, _, labels = self._decide(probs)
        return labels[0], float(score[0]), dict(zip(self.labels, probs[0].tolist()))


class MGFEmotionClassifier(MGFClassifier):
    """The IEMOCAP emotion classifier (4 classes); see :class:`MGFClassifier`.

    Example
    -------
    >>> clf = MGFEmotionClassifier.from_hparams(source="models/mgf_emotion")  # doctest: +SKIP
    >>> label, score, probs = clf.classify_file("speech.wav")                  # doctest: +SKIP
    """

    TASK = "emotion"
