"""One MGF pretraining forward pass, shared by the recipe and the benchmark."""

from mgf_sb.distributed import unwrap
from mgf_sb.objectives.base import ObjectiveInputs


def mgf_forward(features, encoder, target, batch, needs_teacher, epoch=None):
    """Features -> masked student encoding (+ teacher encoding of the unmasked views).

    Features and the teacher run once per distinct view (U); the student runs on
    every masked copy (M = K * U), see :class:`~mgf_sb.batch.MGFBatch`.

    Arguments
    ---------
    features : FeatureExtractor
    encoder : MGFEncoder (or its DDP wrapper)
    target : TargetNetwork
    batch : MGFBatch
    needs_teacher : bool
        Whether an enabled objective uses ``target: teacher``.
    epoch : int, optional
        For the normaliser's statistics schedule (training only).

    Returns
    -------
    ObjectiveInputs
    """
    feats_u, n_u = features(batch.wavs, batch.wav_lens, epoch=epoch)
    feats, n_frames = feats_u[batch.source], n_u[batch.source]
    hidden = encoder(feats, n_frames, mask=batch.input_mask)
    teacher = None
    if needs_teacher:
        teacher = target(unwrap(encoder), feats_u, n_u)[batch.source]
    return ObjectiveInputs(hidden=hidden, feats=feats, teacher=teacher, batch=batch)
