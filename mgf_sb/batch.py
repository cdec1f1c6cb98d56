"""Collate function for pretraining: two views per utterance, and the masks.

The masks are drawn here, in the data loader (as SpeechBrain's BEST-RQ recipe
does), so that runs differing only in loss weights see identical masks for the
same seed, and the training step stays free of sampling code.

Two views for free: each utterance's crop is cut into two disjoint halves that
enter the batch as separate sequences. The utterance-scale loss then needs no
extra forward pass, and the views cannot see each other through attention.

Several masks per view (``mask_copies``, as data2vec 2.0 does): each view is
encoded by the student K times with independent masks while the features and
the target network run once per view, which amortises the teacher's cost.
"""

from dataclasses import dataclass, field
from typing import List

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
    _tensor_fields: tuple = field(
        default=("wavs", "wav_lens", "n_frames", "frame_mask", "span_start", "span_len", "span_valid", "partner",
                 "word_start", "word_len", "word_valid", "source", "utt"),
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
        return self.frame_mask | self.span_mask | self.word_mask

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


class MGFCollate:
    """Builds an :class:`MGFBatch` from SpeechBrain dataset items.

    Arguments
    ---------
    sample_rate : int
    hop_length_ms : float
        Fbank hop (10 ms = 100 frames/s).
    frame_stack : int
        Fbank frames stacked per encoder frame (1 = 100 Hz, 2 = 50 Hz).
    crop_seconds : float
        Longest audio taken from one utterance (both views together).
    n_views : int
        1 or 2 views per utterance (2 is needed by the utterance scale).
    frame_mask_ratio, frame_span_min, frame_span_max :
        Frame-scale mask (spans in encoder frames).
    span_mask_ratio, span_min, span_max, max_spans :
        Phoneme-scale spans (in encoder frames).
    word_mask_ratio, word_span_min, word_span_max :
        Word-scale spans (in encoder frames); ratio 0 turns them off.
    mask_copies : int
        Independently masked student copies of each view (K).
    sig_key : str
        Dataset key of the waveform.
    random_crop : bool
        Random crop position (training) or the start of the file (validation).
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
        mask_copies=1,
        sig_key="sig",
        random_crop=True,
    ):
        if n_views not in (1, 2):
            raise ValueError(f"n_views must be 1 or 2, got {n_views}")
        self.hop = int(round(sample_rate * hop_length_ms / 1000.0))
        self.frame_stack = frame_stack
        self.crop = int(crop_seconds * sample_rate)
        self.n_views = n_views
        self.frame_args = (frame_mask_ratio, frame_span_min, frame_span_max)
        self.span_args = (span_mask_ratio, span_min, span_max)
        self.word_args = (word_mask_ratio, word_span_min, word_span_max)
        self.max_spans = max_spans
        if int(mask_copies) < 1:
            raise ValueError(f"mask_copies must be >= 1, got {mask_copies}")
        self.mask_copies = int(mask_copies)
        self.sig_key = sig_key
        self.random_crop = random_crop

    def _views(self, sig):
        """Crops one waveform (samples,) into ``n_views`` disjoint pieces."""
        n = sig.shape[0]
        if n > self.crop:
            off = int(torch.randint(0, n - self.crop + 1, (1,))) if self.random_crop else 0
            sig = sig[off : off + self.crop]
            n = self.crop
        if self.n_views == 1:
            return [sig]
        half = n // 2
        return [sig[:half], sig[half : 2 * half]]

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
        utt = source // self.n_views
        if self.n_views == 2:  # the other half of the same crop, same copy
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
            **word,
        )
