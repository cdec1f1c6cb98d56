"""The one upstream interface every downstream recipe uses (s3prl-style).

``Upstream(source=...)`` turns waveforms into a list of layer representations:

- ``source: fbank``  - the normalised log-Mel features themselves (1 "layer");
- ``source: random`` - the MGF encoder, randomly initialised (architecture from
  ``reference`` (a pretrained folder) or from ``encoder_config``);
- ``source: <path>`` - a pretrained MGF folder (see :mod:`mgf_sb.pretrained_folder`);
- ``source: hf:<path>`` - a wav2vec 2.0 / HuBERT / WavLM model saved on disk in
  Hugging Face format (``save_pretrained``), loaded with ``transformers``
  (``pip install -e ".[hf]"``) from that local folder only: nothing is downloaded.
  Its layers are the model's ``hidden_states`` (input of the first Transformer
  layer + each layer), at its convolutional front end's rate (50 Hz for all three).

Normalisation statistics come from the pretrained (or reference) folder; for
baselines without one, they are accumulated during the first training epoch,
as in pretraining. Frozen by default: features computed under ``no_grad`` and
in eval mode; ``freeze=False`` fine-tunes the encoder (the recipe gives it its
own learning rate).
"""

import json
import logging
import math
import os
import re

import numpy as np
import torch

from mgf_sb.pretrained_folder import check_finite, load_pretrained, read_config
from mgf_sb.encoder import MGFEncoder
from mgf_sb.features import FeatureExtractor

logger = logging.getLogger(__name__)

BASELINES = ("fbank", "random")
HF_PREFIX = "hf:"


def is_hf_source(source):
    """True for ``hf:<folder>`` upstreams."""
    return str(source).startswith(HF_PREFIX)


class HFWaveformInput(torch.nn.Module):
    """The waveform front end of a Hugging Face speech model, as the recipes see it.

    Does what the model's ``Wav2Vec2FeatureExtractor`` does to raw audio: zeroes the
    padding and, when the saved ``preprocessor_config.json`` says ``do_normalize``,
    normalises each utterance to zero mean and unit variance over its valid samples.
    Exposes ``hop`` (samples per output frame: the product of the conv strides),
    ``frame_stack`` (1), ``frame_rate`` and ``frame_centres`` like
    :class:`~mgf_sb.features.FeatureExtractor`. No trainable state.

    Arguments
    ---------
    sample_rate : int
    conv_kernel, conv_stride : sequence of int
        The model's conv front end (``config.conv_kernel``, ``config.conv_stride``).
    do_normalize : bool

    Example
    -------
    >>> front = HFWaveformInput(16000, (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))
    >>> front.hop, front.receptive_field, front.frame_rate
    (320, 400, 50.0)
    >>> front.frame_centres(16000)[:2].tolist(), len(front.frame_centres(16000))
    ([199.5, 519.5], 49)
    """

    def __init__(self, sample_rate=16000, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                 do_normalize=True):
        super().__init__()
        self.sample_rate, self.do_normalize = int(sample_rate), bool(do_normalize)
        self.conv_kernel = [int(k) for k in conv_kernel]
        self.conv_stride = [int(s) for s in conv_stride]
        self.hop = math.prod(self.conv_stride)
        # samples one output frame sees: k1 + sum_l (k_l - 1) x (stride of the layers below l)
        self.receptive_field, step = 1, 1
        for k, s in zip(self.conv_kernel, self.conv_stride):
            self.receptive_field += (k - 1) * step
            step *= s
        self.frame_stack = 1

    @property
    def frame_rate(self):
        return self.sample_rate / self.hop

    def n_frames_of(self, n_samples):
        """Output frames for ``n_samples`` of audio (the conv stack without padding)."""
        n = int(n_samples)
        for k, s in zip(self.conv_kernel, self.conv_stride):
            n = max((n - k) // s + 1, 0)
        return n

    def frame_centres(self, n_samples):
        """Sample position of each output frame's centre (the middle of its receptive field)."""
        return np.arange(self.n_frames_of(n_samples)) * self.hop + (self.receptive_field - 1) / 2.0

    def forward(self, wavs, wav_lens):
        """(B, S), (B,) relative lengths -> (B, S) model input, (B, S) bool valid-sample mask."""
        n = torch.round(wav_lens.float() * wavs.shape[1]).long().clamp(1, wavs.shape[1])
        valid = torch.arange(wavs.shape[1], device=wavs.device)[None] < n[:, None]
        x = wavs.float() * valid
        if self.do_normalize:
            count = n[:, None].float()
            mean = x.sum(1, keepdim=True) / count
            var = (((x - mean) * valid) ** 2).sum(1, keepdim=True) / count
            x = (x - mean) / torch.sqrt(var + 1e-7) * valid
        return x, valid


def check_hf_folder(folder):
    """A local Hugging Face model folder -> its absolute path; FileNotFoundError naming it otherwise
    (the one check of ``hf:`` folders: the upstream and recipes/evaluate.py's plan)."""
    folder = os.path.abspath(os.path.expanduser(str(folder)))
    if not os.path.isdir(folder) or not os.path.isfile(os.path.join(folder, "config.json")):
        what = "does not exist" if not os.path.exists(folder) else "has no config.json"
        raise FileNotFoundError(
            f"upstream 'hf:{folder}': the folder {what}. hf: takes a local folder holding a Hugging Face "
            f"model saved with save_pretrained (config.json + weights), e.g. a `git clone` of "
            f"facebook/wav2vec2-base; mgf-sb never downloads anything"
        )
    return folder


def load_hf_model(folder):
    """A local Hugging Face speech model folder -> (model, :class:`HFWaveformInput`).

    ``transformers.AutoModel.from_pretrained(folder, local_files_only=True)``: the folder
    must hold ``config.json`` and the weights (``save_pretrained``'s output, e.g. a
    ``git clone`` of a model repository). Nothing is ever downloaded. Weights with NaN
    or Inf values are a ValueError naming the tensor.
    """
    folder = check_hf_folder(folder)
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "upstream 'hf:...' needs the transformers package: pip install -e \".[hf]\"") from e
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if not hasattr(config, "conv_stride"):
        raise ValueError(
            f"upstream 'hf:{folder}': a {type(config).__name__} is not a wav2vec 2.0-style speech encoder "
            f"(supported: wav2vec 2.0, HuBERT, WavLM and other models with a conv front end on raw audio)")
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
    # refused here, naming the tensor, as MGF folders are: NaN weights give NaN layers
    # (a run at chance accuracy that fails only at its end)
    check_finite(model.state_dict(), f"upstream 'hf:{folder}'")
    do_normalize = False
    prep = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(prep):
        with open(prep, encoding="utf-8") as f:
            do_normalize = bool(json.load(f).get("do_normalize", False))
    front = HFWaveformInput(16000, config.conv_kernel, config.conv_stride, do_normalize)
    return model, front


class Upstream(torch.nn.Module):
    """Waveforms -> every layer's representation.

    Arguments
    ---------
    source : str
        ``fbank``, ``random``, the path of a pretrained MGF folder, or ``hf:<path>`` (a local
        Hugging Face wav2vec 2.0 / HuBERT / WavLM folder).
    freeze : bool
        Frozen encoder (no gradient, eval mode) or fine-tuned.
    reference : str, optional
        A pretrained folder whose architecture and normalisation statistics the
        baselines reuse (so that ``random`` is exactly the pretrained model's shape).
    encoder_config : dict, optional
        MGFEncoder kwargs for ``random`` without ``reference``.
    feature_config : dict, optional
        FeatureExtractor kwargs for baselines without ``reference``.

    Example
    -------
    >>> up = Upstream("random", encoder_config=dict(d_model=32, num_layers=2, nhead=4, d_ffn=64))
    >>> layers, n = up(torch.randn(2, 16000), torch.tensor([1.0, 0.5]), update_stats=True)
    >>> len(layers), layers[0].shape, n.tolist()
    (3, torch.Size([2, 101, 32]), [101, 51])
    """

    def __init__(self, source="fbank", freeze=True, reference=None, encoder_config=None, feature_config=None):
        super().__init__()
        self.source, self.freeze = str(source), bool(freeze)
        self.stats_loaded = False
        self.hf = is_hf_source(self.source)
        if self.hf:
            encoder, features = load_hf_model(self.source[len(HF_PREFIX):])
            self.stats_loaded = True  # a Hugging Face model normalises each utterance itself
            logger.info(f"upstream: Hugging Face {type(encoder).__name__} from {self.source[len(HF_PREFIX):]} "
                        f"({encoder.config.num_hidden_layers} layers, {features.frame_rate:g} Hz, "
                        f"do_normalize={features.do_normalize})")
        elif self.source not in BASELINES:
            features, encoder, config = load_pretrained(self.source)
            self.stats_loaded = True
            logger.info(f"upstream: pretrained MGF encoder from {self.source} ({config['meta'].get('step', '?')} steps)")
        else:
            if reference:
                config = read_config(reference)
                features, ref_encoder, _ = load_pretrained(reference)
                self.stats_loaded = True
                encoder_kwargs = config["encoder"]
            else:
                features = FeatureExtractor(**(feature_config or {}))
                encoder_kwargs = dict(encoder_config or {})
                encoder_kwargs.setdefault("input_size", features.output_size)
            encoder = MGFEncoder(**encoder_kwargs) if self.source == "random" else None
            logger.info(f"upstream: baseline '{self.source}'")
        self.features = features
        self.encoder = encoder
        if self.encoder is not None and self.freeze:
            self.encoder.requires_grad_(False)
        elif self.encoder is not None and not self.hf:
            # The mask embedding serves pretraining only: never used downstream,
            # so not trained (DDP would otherwise stop on an unused parameter).
            self.encoder.mask_emb.requires_grad_(False)
        elif self.hf:
            # As when fine-tuning wav2vec 2.0 in SpeechBrain: the conv front end stays frozen,
            # and parameters the forward pass never uses are not trained.
            for name, p in self.encoder.named_parameters():
                if name.startswith(("feature_extractor.", "masked_spec_embed", "quantizer.", "project_q.")):
                    p.requires_grad_(False)

    @property
    def output_size(self):
        if self.hf:
            return int(self.encoder.config.hidden_size)
        return self.features.output_size if self.encoder is None else self.encoder.output_size

    @property
    def num_layers(self):
        """Number of representations returned (input embedding + each layer + each utterance-branch block)."""
        if self.hf:
            return int(self.encoder.config.num_hidden_layers) + 1
        return 1 if self.encoder is None else self.encoder.num_outputs

    @property
    def frame_rate(self):
        return self.features.frame_rate

    def forward(self, wavs, wav_lens, update_stats=False):
        """Encodes a batch.

        Arguments
        ---------
        wavs : torch.Tensor
            (B, samples) 16 kHz waveforms, zero-padded.
        wav_lens : torch.Tensor
            (B,) relative lengths.
        update_stats : bool
            Baselines without loaded statistics accumulate them while True
            (pass ``stage == TRAIN``).

        Returns
        -------
        layers : list of torch.Tensor
            ``num_layers`` tensors (B, T, output_size).
        n_frames : torch.LongTensor
            (B,) valid frames.
        """
        if self.hf:
            return self._forward_hf(wavs, wav_lens)
        # Statistics: fixed once loaded; otherwise accumulated while training.
        self.features.train(bool(update_stats) and not self.stats_loaded)
        feats, n_frames = self.features(wavs, wav_lens, epoch=None if update_stats else 10**9)
        if self.encoder is None:
            return [feats], n_frames
        if self.freeze:
            self.encoder.eval()
            with torch.no_grad():
                layers = self.encoder(feats, n_frames)
            return [h.detach() for h in layers], n_frames
        return self.encoder(feats, n_frames), n_frames

    def _forward_hf(self, wavs, wav_lens):
        """A Hugging Face model: every ``hidden_states`` entry and the valid frames."""
        x, valid = self.features(wavs, wav_lens)
        model = self.encoder
        # Models with a layer-normalised conv front end (wav2vec 2.0 large/lv60, WavLM) take an
        # attention mask; group-normalised ones (base models) expect zero padding only.
        mask = valid.long() if getattr(model.config, "feat_extract_norm", "group") == "layer" else None
        n_frames = model._get_feat_extract_output_lengths(valid.sum(1)).long()
        if self.freeze:
            model.eval()
            with torch.no_grad():
                out = model(x, attention_mask=mask, output_hidden_states=True)
            return [h.detach() for h in out.hidden_states], n_frames
        out = model(x, attention_mask=mask, output_hidden_states=True)
        return list(out.hidden_states), n_frames

    def statistics_ready(self):
        if self.hf:
            return True
        return self.features.normalizer.count > 0


class LayerSelector(torch.nn.Module):
    """One chosen layer, or a learnable softmax-weighted sum (SUPERB style).

    Arguments
    ---------
    num_layers : int
        Number of upstream representations.
    layer : int or None
        A fixed layer index (negative counts from the end), or None for the
        learned weighted sum.

    Example
    -------
    >>> sel = LayerSelector(3)
    >>> sel([torch.ones(2, 4, 8) * i for i in range(3)]).mean().item()
    1.0
    """

    def __init__(self, num_layers, layer=None):
        super().__init__()
        self.layer = layer
        self.weights = torch.nn.Parameter(torch.zeros(num_layers)) if layer is None else None

    def forward(self, layers):
        """list of (B, T, D) -> (B, T, D)."""
        if self.weights is None:
            return layers[self.layer]
        if len(layers) != self.weights.shape[0]:
            raise ValueError(f"LayerSelector built for {self.weights.shape[0]} layers, got {len(layers)}")
        w = torch.softmax(self.weights, 0)
        return torch.einsum("l,lbtd->btd", w.to(layers[0].dtype), torch.stack(layers))

    def normalized_weights(self):
        """The softmax weights as a list (for logs), or None for a fixed layer."""
        return None if self.weights is None else torch.softmax(self.weights.detach(), 0).tolist()


def describe_source(source):
    """Short name of an upstream for tables: fbank, random or the folder's name."""
    s = str(source)
    if is_hf_source(s):
        return "hf:" + os.path.basename(os.path.normpath(s[len(HF_PREFIX):]))
    return s if s in BASELINES else "mgf:" + os.path.basename(os.path.normpath(os.path.dirname(s.rstrip("/")) or s))


def _folder_name(path):
    """A model folder's readable name: its last component, with the run folder's name
    when it is a pretraining run's ``pretrained/`` export, and the run's name when the
    last component is a seed (``results/mgf_ls960/1986/pretrained`` -> ``mgf_ls960-1986``)."""
    parts = [p for p in os.path.normpath(os.path.abspath(os.path.expanduser(path))).split(os.sep) if p]
    if len(parts) > 1 and parts[-1] == "pretrained":
        parts = parts[:-1]
    name = parts[-1] if parts else "model"
    if name.isdigit() and len(parts) > 1:
        name = parts[-2] + "-" + name
    return name


def upstream_tag(source):
    """One short, readable, path-safe tag per upstream, for output folders.

    ``fbank`` | ``random`` | ``mgf-<folder name>`` | ``hf-<folder name>``; characters other
    than letters, digits, ``.``, ``_`` and ``-`` become ``_``.

    Example
    -------
    >>> upstream_tag("fbank"), upstream_tag("results/mgf/1986/pretrained"), upstream_tag("hf:/m/wavlm-base+")
    ('fbank', 'mgf-mgf-1986', 'hf-wavlm-base_')
    """
    s = str(source)
    if s in BASELINES:
        return s
    if is_hf_source(s):
        tag = "hf-" + _folder_name(s[len(HF_PREFIX):])
    else:
        tag = "mgf-" + _folder_name(s)
    return re.sub(r"[^A-Za-z0-9._-]", "_", tag)


def run_folder(task_folder, source, *parts):
    """``<task_folder>/<upstream tag>/<part>/...``: every recipe's default output folder.

    Used from the YAMLs (``!apply:mgf_sb.upstream.run_folder [results/TIMIT, !ref <upstream>,
    !ref <head>, !ref <seed>]``); ``parts`` may be ints (the seed).

    Example
    -------
    >>> run_folder("results/TIMIT", "fbank", "linear", 1986)
    'results/TIMIT/fbank/linear/1986'
    """
    return os.path.join(str(task_folder), upstream_tag(source), *(str(p) for p in parts))
