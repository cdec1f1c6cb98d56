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
and white noise (``view_noise_snr_db``).

Several masks per view (``mask_copies``, as data2vec 2.0 does): each view is
encoded by the student K times with independent masks while the features and
the target network run once per view, which amortises the teacher's cost.
"""

from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch

from mgf_sb.masking import sample_frame_mask, sample_spans, spans_to_mask


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
    _tensor_fields: tuple = field(
        default=("wavs", "wav_lens", "n_frames", "frame_mask", "span_start", "span_len", "span_valid", "partner",
                 "word_start", "word_len", "word_valid", "source", "utt", "peer_mask"),
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


class MGFCollate:
    """Builds an :class:`MGFBatch` from SpeechBrain dataset items.

    Randomness (crop positions, view placement and perturbations, masks) comes
    from torch's global generator of the process that runs the collate; the
    pretraining recipe seeds it per DDP rank (and PyTorch seeds each data-loader
    worker from it), see :func:`mgf_sb.distributed.seed_data_stream`.

    Arguments
    ---------
    sample_rate : int
    hop_length_ms : float
        Fbank hop (10 ms = 100 frames/s).
    frame_stack : int
        Fbank frames stacked per encoder frame (1 = 100 Hz, 2 = 50 Hz).
    crop_seconds : float
        Longest audio taken from one utterance (both views and the gap together).
    n_views : int
        1 or 2 views per utterance (2 is needed by the utterance scale).
    frame_mask_ratio, frame_span_min, frame_span_max :
        Frame-scale mask (spans in encoder frames).
    span_mask_ratio, span_min, span_max, max_spans :
        Phoneme-scale spans (in encoder frames).
    word_mask_ratio, word_span_min, word_span_max :
        Word-scale spans (in encoder frames); ratio 0 turns them off.
    active_scales : iterable of str, optional
        The enabled scales (e.g. the ``ScaleSet``, whose keys they are). Only
        ``frame``, ``phoneme`` and ``word`` in it draw masks. None: every scale
        whose mask ratio is > 0 draws its masks.
    shared_masks : bool
        Draw the frame and phoneme masks even for disabled scales (word spans
        still only when the word scale is active).
    view_gap_seconds : float
        Gap between the two views of a crop (at most ``view_gap_max_fraction``
        of a short crop).
    view_gap_max_fraction : float
        Largest share of a crop the gap may take.
    view_length_jitter : float
        Each view's length is drawn independently, uniform in
        ``[(1 - jitter) * v, v]`` where ``v`` is half of the crop minus the gap;
        it sits at a random position of its half. 0: both views are exactly ``v``.
    view_gain_db : float
        Each view is scaled by an independent random gain, uniform in
        ``[-view_gain_db, +view_gain_db]`` dB (0: off).
    view_eq : float
        Each view is filtered by ``y[t] = x[t] + c x[t-1]``, ``c`` uniform in
        ``[-view_eq, view_eq]`` (a light spectral tilt; 0: off).
    view_noise_snr_db : list of two floats, optional
        ``[low, high]``: white noise is added to each view at an SNR drawn
        uniformly in that range (None: off).
    mask_copies : int
        Independently masked student copies of each view (K).
    sig_key : str
        Dataset key of the waveform.
    random_crop : bool
        Random crop position (training) or the start of the file (validation).
    peer_masks : dict, optional
        ``{name: {"mask_ratio": r, "span": s}}`` for the peer objectives
        (``bestrq``, ``wav2vec2``; mgf_sb/objectives/bestrq.py, wav2vec2.py):
        spans of ``s`` encoder frames covering ``r`` of each sequence on average
        (:func:`~mgf_sb.masking.sample_spans`), drawn only for a peer in
        ``active_scales`` (all listed when it is None), into ``peer_mask``.
    """

    def __init__(
        self,
        sample_rate=16000,
        hop_length_ms=10.0,
        frame_stack=1,
        crop_seconds=8.0,
        n_views=2,
        frame_mask_ratio=0.15,
        frame_span_min=1,
        frame_span_max=3,
        span_mask_ratio=0.3,
        span_min=5,
        span_max=20,
        max_spans=None,
        word_mask_ratio=0.0,
        word_span_min=30,
        word_span_max=60,
        active_scales=None,
        shared_masks=False,
        view_gap_seconds=0.0,
        view_gap_max_fraction=0.34,
        view_length_jitter=0.0,
        view_gain_db=0.0,
        view_eq=0.0,
        view_noise_snr_db=None,
        mask_copies=1,
        sig_key="sig",
        random_crop=True,
        peer_masks=None,
    ):
        if n_views not in (1, 2):
            raise ValueError(f"n_views must be 1 or 2, got {n_views}")
        self.hop = int(round(sample_rate * hop_length_ms / 1000.0))
        self.frame_stack = frame_stack
        self.crop = int(crop_seconds * sample_rate)
        self.n_views = n_views
        active = None if active_scales is None else {str(k) for k in active_scales}

        def draws(scale, shared):
            return active is None or scale in active or (shared and bool(shared_masks))

        self.frame_args = (frame_mask_ratio if draws("frame", True) else 0.0, frame_span_min, frame_span_max)
        self.span_args = (span_mask_ratio if draws("phoneme", True) else 0.0, span_min, span_max)
        self.word_args = (word_mask_ratio if draws("word", False) else 0.0, word_span_min, word_span_max)
        self.max_spans = max_spans
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
        if not 0.0 <= view_length_jitter < 1.0:
            raise ValueError(f"view_length_jitter must be in [0, 1), got {view_length_jitter}")
        if not 0.0 <= view_gap_max_fraction < 1.0:
            raise ValueError(f"view_gap_max_fraction must be in [0, 1), got {view_gap_max_fraction}")
        self.gap = int(round(view_gap_seconds * sample_rate))
        self.gap_max_fraction = float(view_gap_max_fraction)
        self.jitter = float(view_length_jitter)
        self.gain_db = float(view_gain_db)
        self.eq = float(view_eq)
        if view_noise_snr_db is not None:
            lo, hi = (float(view_noise_snr_db), float(view_noise_snr_db)) if isinstance(
                view_noise_snr_db, (int, float)) else (float(view_noise_snr_db[0]), float(view_noise_snr_db[1]))
            view_noise_snr_db = (min(lo, hi), max(lo, hi))
        self.noise_snr = view_noise_snr_db
        self.sig_key = sig_key
        self.random_crop = random_crop

    def _views(self, sig):
        """Crops one waveform (samples,) into ``n_views`` disjoint, perturbed views."""
        n = sig.shape[0]
        if n > self.crop:
            off = int(torch.randint(0, n - self.crop + 1, (1,))) if self.random_crop else 0
            sig = sig[off : off + self.crop]
            n = self.crop
        if self.n_views == 1:
            return [self._perturb(sig)]
        gap = min(self.gap, int(self.gap_max_fraction * n))
        v = (n - gap) // 2  # each view's half; the second half starts at v + gap
        if self.jitter > 0:
            lens = (v * (1.0 - self.jitter * torch.rand(2))).long().clamp(min=1)
            offs = (torch.rand(2) * (v - lens + 1).float()).long()
        else:
            lens, offs = torch.tensor([v, v]), torch.tensor([0, 0])
        a0, b0 = int(offs[0]), v + gap + int(offs[1])
        return [self._perturb(sig[a0 : a0 + int(lens[0])]), self._perturb(sig[b0 : b0 + int(lens[1])])]

    def _perturb(self, x):
        """Independent random gain, EQ tilt and noise of one view (each off at 0 / None)."""
        if self.eq > 0 and x.shape[0] > 1:
            c = float(torch.empty(()).uniform_(-self.eq, self.eq))
            x = torch.cat([x[:1], x[1:] + c * x[:-1]])
        if self.noise_snr is not None and x.shape[0] > 0:
            power = x.float().pow(2).mean()
            snr = float(torch.empty(()).uniform_(*self.noise_snr)) if self.noise_snr[1] > self.noise_snr[0] \
                else self.noise_snr[0]
            x = x + torch.randn_like(x) * torch.sqrt(power / 10 ** (snr / 10.0))
        if self.gain_db > 0:
            x = x * 10 ** (float(torch.empty(()).uniform_(-self.gain_db, self.gain_db)) / 20.0)
        return x

    def __call__(self, items):
        ids, views = [], []
        for item in items:  # a loop over utterances, not frames
            for v, piece in enumerate(self._views(item[self.sig_key])):
                ids.append(f"{item['id']}/{v}")
                views.append(piece)
        U, K = len(views), self.mask_copies
        n_samples = torch.tensor([p.shape[0] for p in views])
        wavs = torch.zeros(U, int(n_samples.max()))
        for i, p in enumerate(views):
            wavs[i, : p.shape[0]] = p
        # Student sequence m = k * U + u is copy k of view u.
        source = torch.arange(U).repeat(K)
        n_frames = n_encoder_frames(n_samples, self.hop, self.frame_stack)[source]
        T = int(n_encoder_frames(wavs.shape[1], self.hop, self.frame_stack))

        span_start, span_len, span_valid = sample_spans(n_frames, *self.span_args, max_spans=self.max_spans)
        taken = spans_to_mask(span_start, span_len, T)
        word = {}
        if self.word_args[0] > 0:  # word spans are drawn on their own and may contain phoneme spans
            word_start, word_len, word_valid = sample_spans(n_frames, *self.word_args)
            word = dict(word_start=word_start, word_len=word_len, word_valid=word_valid)
            taken = taken | spans_to_mask(word_start, word_len, T)
        frame_mask = sample_frame_mask(n_frames, T, *self.frame_args, exclude=taken)
        peer_mask = torch.zeros_like(frame_mask)
        for _, ratio, span in self.peer_args:  # drawn only when a peer is on (MGF runs draw as before)
            peer_mask = spans_to_mask(*sample_spans(n_frames, ratio, span, span)[:2], T)
        utt = source // self.n_views
        if self.n_views == 2:  # the other view of the same crop, same copy
            partner = torch.arange(U * K) + 1 - 2 * (source % 2)
        else:
            partner = torch.full((U * K,), -1)
        return MGFBatch(
            id=[f"{ids[u]}/{k}" if K > 1 else ids[u] for k in range(K) for u in range(U)],
            wavs=wavs,
            wav_lens=n_samples.float() / wavs.shape[1],
            n_frames=n_frames,
            frame_mask=frame_mask,
            span_start=span_start,
            span_len=span_len,
            span_valid=span_valid,
            partner=partner,
            source=source,
            utt=utt,
            peer_mask=peer_mask,
            **word,
        )
