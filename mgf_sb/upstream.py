"""The one upstream interface every downstream recipe uses (s3prl-style).

``Upstream(source=...)`` turns waveforms into a list of layer representations:

- ``source: fbank``  - the normalised log-Mel features themselves (1 "layer");
- ``source: random`` - the MGF encoder, randomly initialised (architecture from
  ``reference`` (a pretrained folder) or from ``encoder_config``);
- ``source: <path>`` - a pretrained MGF folder (see :mod:`mgf_sb.checkpoint`).

Normalisation statistics come from the pretrained (or reference) folder; for
baselines without one, they are accumulated during the first training epoch,
as in pretraining. Frozen by default: features computed under ``no_grad`` and
in eval mode; ``freeze=False`` fine-tunes the encoder (the recipe gives it its
own learning rate).
"""

import logging
import os

import torch

from mgf_sb.checkpoint import load_pretrained, read_config
from mgf_sb.encoder import MGFEncoder
from mgf_sb.features import FeatureExtractor

logger = logging.getLogger(__name__)

BASELINES = ("fbank", "random")


class Upstream(torch.nn.Module):
    """Waveforms -> every layer's representation.

    Arguments
    ---------
    source : str
        ``fbank``, ``random`` or the path of a pretrained MGF folder.
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
        if self.source not in BASELINES:
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
        elif self.encoder is not None:
            # The mask embedding serves pretraining only: never used downstream,
            # so not trained (DDP would otherwise stop on an unused parameter).
            self.encoder.mask_emb.requires_grad_(False)

    @property
    def output_size(self):
        return self.features.output_size if self.encoder is None else self.encoder.output_size

    @property
    def num_layers(self):
        """Number of representations returned (input embedding + each layer)."""
        return 1 if self.encoder is None else self.encoder.num_layers + 1

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

    def statistics_ready(self):
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
    return s if s in BASELINES else "mgf:" + os.path.basename(os.path.normpath(os.path.dirname(s.rstrip("/")) or s))
