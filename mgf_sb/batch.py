"""Collate function for pretraining: two views per utterance, and the masks.

The masks are drawn here, in the data loader (as SpeechBrain's BEST-RQ recipe
does), so the training step stays free of sampling code. Only the enabled
scales draw masks (``active_scales``): "frame scale alone" hides only frame
spans, "utterance scale alone" hides nothing, so each variant's input hides
exactly what its losses score. ``shared_masks=True`` draws the frame and
phoneme masks whatever is enabled (the same mask distribution in every
variant; the behaviour before this switch existed).

Two views for free: each utterance's crop gives two disjoint views that enter
the batch as separate sequences. The utterance-scale loss then needs no extra
forward pass, and the views cannot see each other through attention. So that
the views cannot be matched by trivial cues, they are separated by a gap
(``view_gap_seconds``: no continuity across a cut), have independently
jittered lengths (``view_length_jitter``), and each gets its own random gain
(``view_gain_db``) and, optionally, a random first-order EQ tilt (``view_eq``)
and white noise (``view_noise_snr_db``); ``view_min_seconds`` sets a shortest view.

The collate is two small samplers: :class:`ViewSampler` (crop, views, each
view's channel; :func:`sample_view_windows`, :func:`perturb_view`) and
:class:`~mgf_sb.masking.MaskSampler` (every scale's spans, given in ms and
rounded up to the encoder frame; :func:`~mgf_sb.masking.sample_masks`).

Several masks per view (``mask_copies``, as data2vec 2.0 does): each view is
encoded by the student K times with independent masks while the features and
the target network run once per view, which amortises the teacher's cost.
"""

import logging
from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch

from mgf_sb.masking import MaskSampler, sample_spans, spans_to_mask

logger = logging.getLogger(__name__)


@dataclass
class MGFBatch:
    """A pretraining batch: U = n_views * N views of N utterances, each masked
    K = mask_copies times, giving M = K * U student sequences.

    Attributes
    ----------
    id : list of str
        (M,) ``<utterance id>/<view>``.
    wavs : torch.Tensor
        (U, samples) zero-padded waveforms of the distinct views.
    wav_lens : torch.Tensor
        (U,) relative lengths, as SpeechBrain uses them.
    source : torch.LongTensor
        (M,) which view (row of ``wavs``) each student sequence encodes.
    utt : torch.LongTensor
        (M,) utterance index of each sequence (copies and views of one
        utterance share it; they are never each other's negatives).
    n_frames : torch.LongTensor
        (M,) valid encoder frames of each sequence.
    frame_mask : torch.BoolTensor
        (M, T) frames masked for the frame scale.
    span_start, span_len : torch.LongTensor
        (M, S) phoneme-scale spans (in encoder frames).
    span_valid : torch.BoolTensor
        (M, S) which spans exist.
    word_start, word_len, word_valid :
        (M, W) word-scale spans (0.3-0.6 s; W = 0 when the word scale is off).
    partner : torch.LongTensor
        (M,) index of the other view of the same utterance, -1 if none.
    peer_mask : torch.BoolTensor
        (M, T) frames masked for a peer objective (BEST-RQ / wav2vec 2.0, see
        ``peer_masks`` of :class:`MGFCollate`); all False when none is enabled.
    speaker : torch.LongTensor
        (M,) speaker of each sequence's utterance where the manifest says (its ``spk_id``
        column, numbered by the recipe), -1 unknown; only logged (the utterance scale's
        ``same_speaker_negatives``), never used by a loss.
    """

    id: List[str]
    wavs: torch.Tensor
    wav_lens: torch.Tensor
    n_frames: torch.Tensor
    frame_mask: torch.Tensor
    span_start: torch.Tensor
    span_len: torch.Tensor
    span_valid: torch.Tensor
    partner: torch.Tensor
    word_start: torch.Tensor = None
    word_len: torch.Tensor = None
    word_valid: torch.Tensor = None
    source: torch.Tensor = None
    utt: torch.Tensor = None
    peer_mask: torch.Tensor = None
    speaker: torch.Tensor = None
    _tensor_fields: tuple = field(
        default=("wavs", "wav_lens", "n_frames", "frame_mask", "span_start", "span_len", "span_valid", "partner",
                 "word_start", "word_len", "word_valid", "source", "utt", "peer_mask", "speaker"),
        repr=False,
    )

    def __post_init__(self):
        M = self.frame_mask.shape[0]
        if self.source is None:
            self.source = torch.arange(M)
        if self.utt is None:
            self.utt = torch.arange(M)
        if self.word_start is None:  # no word scale: zero spans
            self.word_start = torch.zeros(M, 0, dtype=torch.long)
            self.word_len = torch.zeros(M, 0, dtype=torch.long)
            self.word_valid = torch.zeros(M, 0, dtype=torch.bool)
        if self.peer_mask is None:  # no peer objective
            self.peer_mask = torch.zeros_like(self.frame_mask)
        if self.speaker is None:  # no speaker known
            self.speaker = torch.full((M,), -1, dtype=torch.long)

    @property
    def span_mask(self):
        """(M, T) union of the phoneme-scale spans."""
        return spans_to_mask(self.span_start, self.span_len, self.frame_mask.shape[1])

    @property
    def word_mask(self):
        """(M, T) union of the word-scale spans."""
        return spans_to_mask(self.word_start, self.word_len, self.frame_mask.shape[1])

    @property
    def input_mask(self):
        """(M, T) every frame the encoder must not see."""
        return self.frame_mask | self.span_mask | self.word_mask | self.peer_mask

    def _map(self, fn):
        kwargs = {"id": self.id}
        for k in self._tensor_fields:
            kwargs[k] = fn(getattr(self, k))
        return MGFBatch(**kwargs)

    def to(self, device, non_blocking=False):
        """Moves every tensor to ``device`` (SpeechBrain calls this)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self):
        """Pins every tensor (for ``pin_memory=True`` loaders)."""
        return self._map(lambda t: t.pin_memory())

    def __len__(self):
        return len(self.id)


def n_encoder_frames(n_samples, hop_length, frame_stack):
    """Encoder frames for waveforms of ``n_samples`` (tensor or int).

    SpeechBrain's Fbank uses a centred STFT: ``samples // hop + 1`` frames;
    stacking ``k`` frames pads up to a multiple of ``k``.
    """
    fbank_frames = n_samples // hop_length + 1
    return (fbank_frames + frame_stack - 1) // frame_stack


def encoder_frame_centres(n_samples, hop_length, frame_stack):
    """Sample position of each encoder frame's centre for a waveform of ``n_samples`` (int).

    Fbank frame ``i`` is centred at ``i * hop_length`` (centred STFT); an encoder frame stacking
    ``k`` of them sits in their middle. Frame-level labels are read at these positions.

    >>> encoder_frame_centres(800, 160, 2).tolist()
    [80.0, 400.0, 720.0]
    """
    n = n_encoder_frames(int(n_samples), hop_length, frame_stack)
    return (np.arange(n) * frame_stack + (frame_stack - 1) / 2.0) * hop_length


def nearest_frames(centres, targets):
    """Index of the frame (of ``centres``, sorted) nearest to each position of ``targets``.

    Scores any upstream at 100 fps labels (TIMIT, the quality benchmark): each 10 ms frame takes the prediction of the
    upstream frame whose centre is closest (ties go to the earlier frame).

    >>> nearest_frames([80.0, 400.0, 720.0], [0, 160, 320, 480, 640, 800]).tolist()
    [0, 0, 1, 1, 2, 2]
    """
    centres, targets = np.asarray(centres, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    right = np.clip(np.searchsorted(centres, targets, side="left"), 0, len(centres) - 1)
    left = np.clip(right - 1, 0, len(centres) - 1)
    closer_left = np.abs(targets - centres[left]) <= np.abs(centres[right] - targets)
    return np.where(closer_left, left, right).astype(np.int64)


def sample_view_windows(n, crop, n_views=2, gap=0, gap_max_fraction=0.34, jitter=0.0, min_view=0,
                        random_crop=True, strict_gap=False):
    """Where the views of one waveform lie (the collate's view half, as ``compute_mask_indices`` is fairseq's mask).

    A crop of at most ``crop`` samples (random position, or the start of the
    file) is cut into ``n_views`` disjoint views: for two, each half of the
    crop minus a central ``gap`` holds one view of independently jittered
    length at a random position in its half.

    Arguments
    ---------
    n : int
        Samples of the waveform.
    crop : int
        Longest audio taken (both views and the gap together).
    n_views : int
        1 or 2.
    gap : int
        Samples skipped between the views (at most ``gap_max_fraction`` of the crop, unless
        ``strict_gap``).
    gap_max_fraction : float
    jitter : float
        Each view's length is uniform in ``[max((1 - jitter) v, min_view), v]``,
        ``v`` = half of the crop minus the gap.
    min_view : int
        Shortest view in samples. A crop too short for two such views first
        loses its gap; if it is still too short it gives one view (the whole
        crop; it has no partner for the utterance scale).
    random_crop : bool
    strict_gap : bool
        Never shrink the gap (neither by ``gap_max_fraction`` nor for ``min_view``): a crop too
        short for two views (of at least ``min_view`` and 1 sample) with the whole gap between
        them gives one view. The two views' audio is then always at least ``gap`` samples apart:
        ``gap + (v - len_0 - start_0) + start_1`` with ``start_i`` a view's offset in its half,
        on average ``gap + (v - lo) / 2`` and at most ``gap + 2 (v - lo)`` (``lo`` the
        shortest jittered length).

    Returns
    -------
    list of (int, int)
        ``(start, stop)`` of each view, in samples of the waveform.

    Example
    -------
    >>> sample_view_windows(1000, 2000, gap=100, random_crop=False)
    [(0, 450), (550, 1000)]
    >>> sample_view_windows(1000, 2000, gap=100, min_view=600)
    [(0, 1000)]
    >>> sample_view_windows(1000, 2000, gap=500, random_crop=False)  # capped: 0.34 of the crop
    [(0, 330), (670, 1000)]
    >>> sample_view_windows(1000, 2000, gap=500, random_crop=False, strict_gap=True)
    [(0, 250), (750, 1000)]
    """
    off = 0
    if n > crop:
        off = int(torch.randint(0, n - crop + 1, (1,))) if random_crop else 0
        n = crop
    if n_views == 1:
        return [(off, off + n)]
    if strict_gap:  # the gap as asked, or no pair
        g = gap
        v = (n - g) // 2
        if v < max(min_view, 1):
            return [(off, off + n)]
    else:
        g = min(gap, int(gap_max_fraction * n))
        if min_view > 0 and (n - g) // 2 < min_view:
            g = min(g, max(0, n - 2 * min_view))  # the gap gives way first
    v = (n - g) // 2  # each view's half; the second half starts at v + g
    if min_view > 0 and v < min_view:
        return [(off, off + n)]
    if jitter > 0:
        lo = max((1.0 - jitter) * v, float(min_view))
        lens = (v - (v - lo) * torch.rand(2)).long().clamp(min=1)
        offs = (torch.rand(2) * (v - lens + 1).float()).long()
    else:
        lens, offs = torch.tensor([v, v]), torch.tensor([0, 0])
    a0, b0 = off + int(offs[0]), off + v + g + int(offs[1])
    return [(a0, a0 + int(lens[0])), (b0, b0 + int(lens[1]))]


def perturb_view(x, gain_db=0.0, eq=0.0, noise_snr_db=None):
    """One view's own random channel: EQ tilt, white noise, gain (each off at 0 / None).

    Arguments
    ---------
    x : torch.Tensor
        (samples,) waveform.
    gain_db : float
        Gain uniform in ``[-gain_db, gain_db]`` dB.
    eq : float
        First-order filter ``y[t] = x[t] + c x[t-1]``, ``c`` uniform in
        ``[-eq, eq]``: a spectral tilt of ``20 log10((1 + c) / (1 - c))`` dB
        between 0 Hz and Nyquist (eq 0.3: up to +-5.4 dB).
    noise_snr_db : tuple of two floats, optional
        White noise at an SNR uniform in ``[low, high]`` dB.

    Returns
    -------
    torch.Tensor
        (samples,) the perturbed view.
    """
    if eq > 0 and x.shape[0] > 1:
        c = float(torch.empty(()).uniform_(-eq, eq))
        x = torch.cat([x[:1], x[1:] + c * x[:-1]])
    if noise_snr_db is not None and x.shape[0] > 0:
        power = x.float().pow(2).mean()
        lo, hi = noise_snr_db
        snr = float(torch.empty(()).uniform_(lo, hi)) if hi > lo else lo
        x = x + torch.randn_like(x) * torch.sqrt(power / 10 ** (snr / 10.0))
    if gain_db > 0:
        x = x * 10 ** (float(torch.empty(()).uniform_(-gain_db, gain_db)) / 20.0)
    return x


class ViewSampler:
    """The collate's view half: crops one waveform into perturbed views.

    Arguments
    ---------
    sample_rate : int
    crop_seconds : float
        Longest audio taken from one utterance (both views and the gap together).
    n_views : int
        1 or 2 views per utterance (2 is needed by the utterance scale).
    gap_seconds, gap_max_fraction, length_jitter :
        See :func:`sample_view_windows`.
    gap_strict : bool
        Views always at least ``gap_seconds`` apart; a crop too short gives one view
        (``strict_gap`` of :func:`sample_view_windows`). False: the gap shrinks on short crops
        (logged once, at construction: :meth:`gap_note`).
    min_view_seconds : float
        Shortest view (0: no minimum; see :func:`sample_view_windows`).
    gain_db, eq, noise_snr_db :
        Each view's own channel (see :func:`perturb_view`); ``noise_snr_db`` a
        number or ``[low, high]``.

    Example
    -------
    >>> views = ViewSampler(crop_seconds=2.0, gap_seconds=0.5)(torch.randn(48000), random_crop=False)
    >>> [v.shape[0] for v in views]
    [12000, 12000]
    """

    def __init__(self, sample_rate=16000, crop_seconds=8.0, n_views=2, gap_seconds=0.0, gap_max_fraction=0.34,
                 length_jitter=0.0, min_view_seconds=0.0, gain_db=0.0, eq=0.0, noise_snr_db=None, gap_strict=False):
        if n_views not in (1, 2):
            raise ValueError(f"n_views must be 1 or 2, got {n_views}")
        if not 0.0 <= length_jitter < 1.0:
            raise ValueError(f"view_length_jitter must be in [0, 1), got {length_jitter}")
        if not 0.0 <= gap_max_fraction < 1.0:
            raise ValueError(f"view_gap_max_fraction must be in [0, 1), got {gap_max_fraction}")
        if not 0.0 <= float(min_view_seconds or 0.0) <= crop_seconds / 2:
            raise ValueError(f"view_min_seconds must be in [0, crop_seconds / 2 = {crop_seconds / 2}], "
                             f"got {min_view_seconds}")
        if not 0.0 <= eq < 1.0:
            raise ValueError(f"view_eq must be in [0, 1) (the filter's coefficient), got {eq}")
        self.crop = int(crop_seconds * sample_rate)
        self.n_views = n_views
        self.gap = int(round(gap_seconds * sample_rate))
        self.gap_max_fraction = float(gap_max_fraction)
        self.jitter = float(length_jitter)
        self.min_view = int(round(float(min_view_seconds or 0.0) * sample_rate))
        self.gain_db = float(gain_db)
        self.eq = float(eq)
        if noise_snr_db is not None:
            lo, hi = (float(noise_snr_db), float(noise_snr_db)) if isinstance(noise_snr_db, (int, float)) else (
                float(noise_snr_db[0]), float(noise_snr_db[1]))
            noise_snr_db = (min(lo, hi), max(lo, hi))
        self.noise_snr = noise_snr_db
        self.gap_strict = bool(gap_strict)
        self.sample_rate = sample_rate
        note = self.gap_note()
        if note:
            logger.info(note)

    def gap_note(self):
        """What the gap really is on short crops (None when there is no gap or no pair): the cap
        ``gap_max_fraction`` and ``min_view_seconds`` shrink it silently otherwise."""
        if self.n_views != 2 or self.gap <= 0:
            return None
        sr, asked = self.sample_rate, self.gap / self.sample_rate
        shortest_pair = (self.gap + 2 * max(self.min_view, 1)) / sr
        if self.gap_strict:
            return (f"views: view_gap_seconds={asked:g} s kept on every crop (view_gap_strict); a crop shorter "
                    f"than {shortest_pair:.2f} s gives one view (no pair for the utterance scale)")
        full = max(self.gap / self.gap_max_fraction, (self.gap + 2 * self.min_view)) / sr
        crop = self.crop / sr
        where = (f"every crop (crop_seconds={crop:g} s is shorter than {full:.2f} s)" if crop < full
                 else f"crops shorter than {full:.2f} s (files shorter than that)")
        return (f"views: view_gap_seconds={asked:g} s shrinks on {where}: to view_gap_max_fraction="
                f"{self.gap_max_fraction:g} of the crop, and below what view_min_seconds={self.min_view / sr:g} s "
                f"leaves; view_gap_strict=True keeps the gap and gives such crops one view")

    def __call__(self, sig, random_crop=True):
        """(samples,) waveform -> list of 1 or 2 perturbed views."""
        windows = sample_view_windows(sig.shape[0], self.crop, self.n_views, self.gap, self.gap_max_fraction,
                                      self.jitter, self.min_view, random_crop, self.gap_strict)
        return [perturb_view(sig[a:b], self.gain_db, self.eq, self.noise_snr) for a, b in windows]


# MGFCollate's flat keywords (the arguments before the view / mask split), routed by name.
_FLAT_VIEW_KEYS = {"crop_seconds": "crop_seconds", "n_views": "n_views", "view_gap_seconds": "gap_seconds",
                   "view_gap_max_fraction": "gap_max_fraction", "view_length_jitter": "length_jitter",
                   "view_min_seconds": "min_view_seconds", "view_gain_db": "gain_db", "view_eq": "eq",
                   "view_noise_snr_db": "noise_snr_db", "view_gap_strict": "gap_strict"}
_FLAT_MASK_SPANS = {"frame_mask_ratio": ("frame", None), "frame_span_min": ("frame", 0),
                    "frame_span_max": ("frame", 1), "span_mask_ratio": ("phoneme", None), "span_min": ("phoneme", 0),
                    "span_max": ("phoneme", 1), "word_mask_ratio": ("word", None), "word_span_min": ("word", 0),
                    "word_span_max": ("word", 1)}
_FLAT_MASK_KEYS = ("active_scales", "shared_masks", "max_spans", "whole_frame_spans")
# Their defaults, spans in encoder frames (MGFCollate() with no arguments behaves as it always did).
_FLAT_MASK_DEFAULTS = {"frame": (0.15, 1, 3), "phoneme": (0.3, 5, 20), "word": (0.0, 30, 60)}


class MGFCollate:
    """Builds an :class:`MGFBatch` from SpeechBrain dataset items: views, then masks.

    Two samplers do the work: a :class:`ViewSampler` (crop, views and their
    channel perturbation) and a :class:`~mgf_sb.masking.MaskSampler` (each
    scale's spans, in ms, rounded up to the encoder frame
    ``hop_length_ms x frame_stack``); see hparams/mgf.yaml ``collate_args``.

    Randomness (crop positions, view placement and perturbations, masks) comes
    from torch's global generator of the process that runs the collate; the
    pretraining recipe seeds it per DDP rank (and PyTorch seeds each data-loader
    worker from it), see :func:`mgf_sb.distributed.seed_data_stream`.

    Arguments
    ---------
    views : dict or ViewSampler, optional
        The :class:`ViewSampler` or its keyword arguments (``sample_rate`` is added).
    masks : dict or MaskSampler, optional
        The :class:`~mgf_sb.masking.MaskSampler` or its keyword arguments
        (``frame_ms`` is added): ``frame`` / ``phoneme`` / ``word`` as
        ``{"mask_ratio": r, "span_ms": [min, max]}``, ``active_scales``,
        ``shared_masks``, ``whole_frame_spans``, ``max_spans``.
    sample_rate : int
    hop_length_ms : float
        Fbank hop (10 ms = 100 frames/s).
    frame_stack : int
        Fbank frames stacked per encoder frame (1 = 100 Hz, 2 = 50 Hz).
    mask_copies : int
        Independently masked student copies of each view (K).
    sig_key : str
        Dataset key of the waveform.
    random_crop : bool
        Random crop position (training) or the start of the file (validation).
    speaker_key : str
        Dataset key of the utterance's speaker number (an int >= 0; the recipe adds it when the
        manifest has a ``spk_id`` column), into ``MGFBatch.speaker``; items without it: -1.
    peer_masks : dict, optional
        ``{name: {"mask_ratio": r, "span": s}}`` for the peer objectives
        (``bestrq``, ``wav2vec2``; mgf_sb/objectives/bestrq.py, wav2vec2.py):
        spans of ``s`` encoder frames covering ``r`` of each sequence on average
        (:func:`~mgf_sb.masking.sample_spans`), drawn only for a peer in
        ``active_scales`` (all listed when it is None), into ``peer_mask``.
    **flat :
        The keywords of the collate before the split, still accepted (and
        overriding the matching entry of ``views`` / ``masks``): ``crop_seconds``,
        ``n_views``, ``view_*`` (``view_gap_seconds``, ...), the mask keys
        ``frame_mask_ratio``, ``span_mask_ratio``, ``word_mask_ratio`` and the
        spans in *encoder frames* ``frame_span_min/max``, ``span_min/max``,
        ``word_span_min/max``, and ``active_scales``, ``shared_masks``,
        ``max_spans``, ``whole_frame_spans``.
    """

    def __init__(self, views=None, masks=None, sample_rate=16000, hop_length_ms=10.0, frame_stack=1, mask_copies=1,
                 sig_key="sig", random_crop=True, peer_masks=None, speaker_key="speaker", **flat):
        unknown = sorted(set(flat) - set(_FLAT_VIEW_KEYS) - set(_FLAT_MASK_SPANS) - set(_FLAT_MASK_KEYS))
        if unknown:
            raise TypeError(f"MGFCollate got unknown arguments {unknown}")
        self.hop = int(round(sample_rate * hop_length_ms / 1000.0))
        self.frame_stack = frame_stack
        frame_ms = hop_length_ms * frame_stack
        if not isinstance(views, ViewSampler):
            views = dict(views or {}, sample_rate=sample_rate)
            views.update({_FLAT_VIEW_KEYS[k]: v for k, v in flat.items() if k in _FLAT_VIEW_KEYS})
            views = ViewSampler(**views)
        self.views = views
        self.n_views = views.n_views
        if not isinstance(masks, MaskSampler):
            masks = self._mask_args(masks, flat, frame_ms)
            masks = MaskSampler(frame_ms=frame_ms, **masks)
        self.masks = masks
        active = masks.active_scales
        self.peer_args = [(name, float(a["mask_ratio"]), int(a["span"])) for name, a in (peer_masks or {}).items()
                          if active is None or name in active]
        for name, ratio, span in self.peer_args:
            if not 0.0 < ratio < 1.0 or span < 1:
                keys = "bestrq_mask_prob x bestrq_mask_length" if name == "bestrq" else f"{name}_mask_prob"
                raise ValueError(f"{name} mask: fraction of frames masked {ratio} ({keys} in hparams/mgf.yaml) must be "
                                 f"in (0, 1) and its span ({span} encoder frames) >= 1: change those keys")
        if len(self.peer_args) > 1:
            raise ValueError(f"peers {[a[0] for a in self.peer_args]} are all enabled: they are separate baselines; "
                             f"enable one (e.g. --use_bestrq=True --use_wav2vec2=False)")
        if int(mask_copies) < 1:
            raise ValueError(f"mask_copies must be >= 1, got {mask_copies}")
        self.mask_copies = int(mask_copies)
        self.sig_key = sig_key
        self.speaker_key = speaker_key
        self.random_crop = random_crop

    @staticmethod
    def _mask_args(masks, flat, frame_ms):
        """MaskSampler keywords from ``masks`` (spans in ms) and the flat keywords (spans in frames)."""
        if masks is None:  # the flat keywords alone, with their old defaults
            masks = {scale: {"mask_ratio": r, "span_ms": [lo * frame_ms, hi * frame_ms]}
                     for scale, (r, lo, hi) in _FLAT_MASK_DEFAULTS.items()}
        else:
            masks = {k: (dict(v, span_ms=list(v["span_ms"])) if k in MaskSampler.SCALES and v else v)
                     for k, v in masks.items()}
        for key, (scale, end) in _FLAT_MASK_SPANS.items():
            if key not in flat:
                continue
            spec = masks.setdefault(scale, {"mask_ratio": 0.0, "span_ms": [frame_ms, frame_ms]})
            if end is None:
                spec["mask_ratio"] = flat[key]
            else:
                spec["span_ms"][end] = flat[key] * frame_ms
        masks.update({k: flat[k] for k in _FLAT_MASK_KEYS if k in flat})
        return masks

    def __call__(self, items):
        ids, views, view_utt, partner_view, utt_speaker = [], [], [], [], []
        for i, item in enumerate(items):  # a loop over utterances, not frames
            spk = item.get(self.speaker_key) if hasattr(item, "get") else None
            utt_speaker.append(-1 if spk is None else int(spk))
            pieces = self.views(item[self.sig_key], random_crop=self.random_crop)
            first = len(views)
            for v, piece in enumerate(pieces):
                ids.append(f"{item['id']}/{v}")
                views.append(piece)
                view_utt.append(i)
                # the other view of the same crop (none when the crop gave one view)
                partner_view.append(first + 1 - v if len(pieces) == 2 else -1)
        U, K = len(views), self.mask_copies
        n_samples = torch.tensor([p.shape[0] for p in views])
        wavs = torch.zeros(U, int(n_samples.max()))
        for i, p in enumerate(views):
            wavs[i, : p.shape[0]] = p
        # Student sequence m = k * U + u is copy k of view u.
        source = torch.arange(U).repeat(K)
        n_frames = n_encoder_frames(n_samples, self.hop, self.frame_stack)[source]
        T = int(n_encoder_frames(wavs.shape[1], self.hop, self.frame_stack))

        masks = self.masks(n_frames, T)
        peer_mask = torch.zeros_like(masks["frame_mask"])
        for _, ratio, span in self.peer_args:  # drawn only when a peer is on (MGF runs draw as before)
            peer_mask = spans_to_mask(*sample_spans(n_frames, ratio, span, span)[:2], T)
        utt = torch.tensor(view_utt)[source]
        pv = torch.tensor(partner_view)[source]  # same copy k: sequence k * U + partner view
        partner = torch.where(pv >= 0, pv + (torch.arange(U * K) // U) * U, torch.full_like(pv, -1))
        return MGFBatch(
            id=[f"{ids[u]}/{k}" if K > 1 else ids[u] for k in range(K) for u in range(U)],
            wavs=wavs,
            wav_lens=n_samples.float() / wavs.shape[1],
            n_frames=n_frames,
            partner=partner,
            source=source,
            utt=utt,
            peer_mask=peer_mask,
            speaker=torch.tensor(utt_speaker, dtype=torch.long)[utt],
            **masks,
        )
