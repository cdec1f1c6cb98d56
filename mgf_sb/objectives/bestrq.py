"""BEST-RQ as a peer of MGF: SpeechBrain's random-projection quantiser targets.

BEST-RQ (Chiu et al., 2022; SpeechBrain's ``speechbrain.lobes.models.BESTRQ``
recipe) predicts, for each masked frame, the index that a *fixed* random
quantiser gives to the unmasked input there: SpeechBrain's
:class:`~speechbrain.nnet.quantisers.RandomProjectionQuantizer` (a Xavier
projection to ``cb_dim``, then the nearest of ``cb_vocab`` random unit codes;
both are buffers, never trained). A linear head on the encoder's last layer
classifies each masked frame among the ``cb_vocab`` codes with cross-entropy.

Here it runs through MGF's own recipe so that only the objective differs from
MGF: the same FeatureExtractor (the quantiser reads the normalised, stacked
log-Mel frames the encoder sees), the same Transformer encoder and budget, the
encoder's learned mask embedding on the masked frames, and the same exported
folder. What differs from SpeechBrain's BEST-RQ recipe, on purpose: its
Conformer over a 4x-downsampling CNN (40 ms frames, the quantiser reading 4
stacked fbank frames) is MGF's Transformer at ``frame_ms`` over
``frame_stack`` stacked frames; its masked frames get Gaussian noise, ours the
mask embedding; its ``compute_mask`` draws one set of positions for the whole
batch from the shortest sequence, ours draws each sequence's spans in the
collate (``peer_masks`` of :class:`~mgf_sb.batch.MGFCollate`) with the same
statistics: spans of ``mask_length`` x 40 ms covering ``mask_prob x
mask_length`` of the frames (BEST-RQ.yaml: 0.15 x 4 = 60 %, 160 ms spans).
"""

import torch
import torch.nn.functional as F
from speechbrain.nnet.linear import Linear
from speechbrain.nnet.quantisers import RandomProjectionQuantizer


def nearest_codes(quantiser, x, chunk=4096):
    """The code index :class:`RandomProjectionQuantizer` gives each row of ``x``.

    The same result as ``quantiser(x)`` without its (B, cb_vocab, T, cb_dim)
    distance tensor (1 GB for a 16 x 140-frame batch with 8192 codes): the
    projected input and the codes are unit vectors, so the nearest code is the
    one with the largest dot product. Computed in float32 (outside autocast).

    Arguments
    ---------
    quantiser : RandomProjectionQuantizer
    x : torch.Tensor
        (N, input_dim) frames.
    chunk : int
        Rows scored at a time (bounds the (chunk, cb_vocab) score matrix).

    Returns
    -------
    torch.LongTensor
        (N,) code indices.

    Example
    -------
    >>> q = RandomProjectionQuantizer(8, 4, 16)
    >>> x = torch.randn(3, 5, 8)
    >>> bool((nearest_codes(q, x.reshape(15, 8)) == q(x).reshape(15)).all())
    True
    """
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        z = F.normalize(x.float() @ quantiser.P.float(), dim=-1)
        if z.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=x.device)
        return torch.cat([(part @ quantiser.CB.float().T).argmax(-1) for part in z.split(chunk)])


def code_perplexity(codes, vocab):
    """exp(entropy) of the histogram of ``codes`` (N,): how many of the ``vocab`` codes are in use.

    >>> code_perplexity(torch.tensor([0, 1, 2, 3]), 8)
    4.0
    """
    if codes.numel() == 0:
        return 0.0
    p = torch.bincount(codes, minlength=vocab).float() / codes.numel()
    p = p[p > 0]
    return round(float(torch.exp(-(p * p.log()).sum())), 4)


class BestRQObjective(torch.nn.Module):
    """Masked-frame classification of random-projection quantiser codes (BEST-RQ).

    Arguments
    ---------
    d_model : int
        Encoder width.
    feat_dim : int
        Features per encoder frame (n_mels x frame_stack): the quantiser's input.
    cb_dim : int
        Projection / code size (BEST-RQ.yaml: 16).
    cb_vocab : int
        Number of codes = classes (BEST-RQ.yaml: 8192).
    layer : int
        Encoder layer that predicts (-1: the last, as BEST-RQ).

    The masked frames are ``batch.peer_mask`` (drawn by the collate when the
    objective is enabled: ``use_bestrq``). Stats: ``acc`` (masked frames whose
    code is predicted), ``code_ppl`` (perplexity of the target codes in the
    batch: codebook usage) and ``units`` (masked frames).

    Example
    -------
    >>> obj = BestRQObjective(d_model=16, feat_dim=8, cb_dim=4, cb_vocab=32)
    >>> [p.requires_grad for p in obj.quantiser.parameters()]  # its P and CB are buffers
    []
    """

    def __init__(self, d_model, feat_dim, cb_dim=16, cb_vocab=8192, layer=-1):
        super().__init__()
        self.quantiser = RandomProjectionQuantizer(feat_dim, cb_dim, cb_vocab)
        self.head = Linear(input_size=d_model, n_neurons=cb_vocab)
        self.cb_vocab = cb_vocab
        self.layer = layer

    def targets(self, feats, mask):
        """Code of each masked frame of the unmasked features: (M, T, F), (M, T) -> (N,)."""
        return nearest_codes(self.quantiser, feats[mask])

    def forward(self, inputs):
        """Returns ``(loss, stats)`` for one batch (see :class:`~mgf_sb.objectives.base.ObjectiveInputs`)."""
        hidden = inputs.hidden[self.layer]
        mask = inputs.batch.peer_mask[:, : hidden.shape[1]].to(hidden.device)
        if not bool(mask.any()):  # nothing masked (use_bestrq without its masks, or very short sequences)
            return hidden.sum() * 0.0, {"units": 0.0}
        codes = self.targets(inputs.feats, mask)
        logits = self.head(hidden[mask]).float()  # (N, cb_vocab)
        loss = F.cross_entropy(logits, codes)
        with torch.no_grad():
            acc = float((logits.argmax(-1) == codes).float().mean())
        return loss, {"acc": acc, "code_ppl": code_perplexity(codes, self.cb_vocab), "units": float(codes.numel())}
