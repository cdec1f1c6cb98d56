"""A random recording channel applied to log-Mel features.

Two views of one utterance recorded through the *same* channel can be matched
by the channel alone (its EQ, its level, its noise floor), which says nothing
about the speaker: a contrastive utterance objective then learns "same
recording", not "same speaker" (issue 33). Giving each view its own random
channel removes that shortcut. Doing it in the log-Mel domain (rather than on
the waveform) costs a few element-wise operations per batch and needs no
filter design: an EQ is an additive curve over the Mel bins, a gain an
additive constant, and a noise floor an addition in the power domain.

Units: SpeechBrain's ``Fbank`` (``Filterbank`` with ``power_spectrogram=2``,
the default of ``Fbank``) returns ``10 * log10(power)``, i.e. decibels, clipped
at ``top_db`` (80 dB) below each sequence's maximum. ``log_units="db"`` (the
default) is that; ``log_units="ln"`` is the natural log of power (e.g. Kaldi's
fbank).
"""

import math

import torch

# natural-log-of-power units per feature unit
LOG_UNITS = {
    "db": math.log(10.0) / 10.0,  # SpeechBrain Fbank: 10 * log10(power)
    "ln": 1.0,  # natural log of power
}
DB_PER_LN = 10.0 / math.log(10.0)


def _uniform(shape, low, high, generator):
    """Uniform draws in [low, high) on the CPU (so a CPU generator works for any device)."""
    return low + (high - low) * torch.rand(shape, generator=generator)


def eq_curves(n_rows, n_bins, n_knots=6, eq_db=3.0, generator=None):
    """Smooth random EQ curves in dB: one per row.

    Knots evenly spaced over the bins (the first on bin 0, the last on the top
    bin), each uniform in ``[-eq_db, eq_db]``, joined by cosine interpolation:
    the curve passes through the knots, stays within their range (so within
    ±``eq_db``), and its slope is continuous (zero at the knots), so no bin
    gets a kink that a network could key on.

    Arguments
    ---------
    n_rows, n_bins : int
    n_knots : int
        >= 2.
    eq_db : float
    generator : torch.Generator, optional
        A CPU generator.

    Returns
    -------
    torch.Tensor
        (n_rows, n_bins) dB, on the CPU.

    >>> eq_curves(3, 80).shape
    torch.Size([3, 80])
    """
    if n_knots < 2:
        raise ValueError(f"n_knots must be >= 2, got {n_knots}")
    knots = _uniform((n_rows, n_knots), -eq_db, eq_db, generator)  # (N, K)
    # position of each bin on the knot axis: 0 .. K-1
    pos = torch.linspace(0.0, n_knots - 1.0, n_bins)  # (F,)
    left = pos.floor().long().clamp(max=n_knots - 2)  # (F,) index of the knot on the left
    t = pos - left  # (F,) in [0, 1]
    w = 0.5 - 0.5 * torch.cos(math.pi * t)  # cosine easing: C1 at the knots
    return knots[:, left] * (1.0 - w) + knots[:, left + 1] * w  # (N, F)


def random_log_mel_channel(
    feats,
    n_knots=6,
    eq_db=3.0,
    gain_db=3.0,
    noise_floor_db=(30.0, 50.0),
    generator=None,
    log_units="db",
    n_frames=None,
):
    """Passes each row of log-Mel features through its own random channel.

    Per row, independently: a smooth EQ curve over the Mel bins (``n_knots``
    knots uniform in ±``eq_db``, :func:`eq_curves`), a gain uniform in
    ±``gain_db``, then a flat noise floor ``U(noise_floor_db)`` dB below the
    row's level (10 log10 of its mean power over valid frames and bins, after
    EQ and gain), added in the power domain: ``log(exp(x) + floor)``. Loud bins
    barely move; bins near or below the floor rise to it.

    Arguments
    ---------
    feats : torch.Tensor
        (N, T, F) log-Mel features, *unnormalised* (SpeechBrain ``Fbank``'s
        output, in ``log_units``).
    n_knots : int
        Knots of the EQ curve (>= 2).
    eq_db : float
        Range of each knot, ±dB; 0 disables the EQ.
    gain_db : float
        Range of the gain, ±dB; 0 disables it.
    noise_floor_db : tuple of float, optional
        (low, high): the floor is this many dB below the row's level, uniform
        in the range. None disables the floor.
    generator : torch.Generator, optional
        A CPU generator; the same seed gives the same channels.
    log_units : str
        "db" (10 log10 power: SpeechBrain ``Fbank``) or "ln" (natural log of power).
    n_frames : torch.Tensor, optional
        (N,) valid frames per row: the level is measured on them only (padding
        frames are still transformed; mask them afterwards if needed).

    Returns
    -------
    torch.Tensor
        (N, T, F) in the same units, dtype and device as ``feats``.

    Example
    -------
    >>> x = torch.full((2, 10, 80), 40.0)
    >>> y = random_log_mel_channel(x, generator=torch.Generator().manual_seed(0))
    >>> y.shape, bool((y - x).abs().max() < 6.1)
    (torch.Size([2, 10, 80]), True)
    """
    if feats.dim() != 3:
        raise ValueError(f"feats must be (N, T, F), got shape {tuple(feats.shape)}")
    if log_units not in LOG_UNITS:
        raise ValueError(f"log_units must be one of {sorted(LOG_UNITS)}, got {log_units!r}")
    N, T, F = feats.shape
    to_ln = LOG_UNITS[log_units]  # feature units -> natural log of power
    device, dtype = feats.device, feats.dtype
    # Draw everything on the CPU in a fixed order (EQ, gain, floor): one
    # generator reproduces the same channels on any device.
    offset_db = torch.zeros(N, F)
    if eq_db > 0:
        offset_db = offset_db + eq_curves(N, F, n_knots, eq_db, generator)
    if gain_db > 0:
        offset_db = offset_db + _uniform((N, 1), -gain_db, gain_db, generator)
    below_db = None
    if noise_floor_db is not None:
        low, high = noise_floor_db
        below_db = _uniform((N,), float(low), float(high), generator)
    # compute in float32 at least: logsumexp over bins in fp16 loses the floor
    # natural log of power, (N, T, F)
    ln_power = feats.float() * to_ln + (offset_db / DB_PER_LN).to(device)[:, None, :]
    if below_db is None:
        return (ln_power / to_ln).to(dtype)
    valid = torch.ones(N, T, dtype=torch.bool, device=device)
    if n_frames is not None:
        valid = torch.arange(T, device=device)[None, :] < n_frames.to(device)[:, None]
    masked = ln_power.masked_fill(~valid[..., None], float("-inf"))
    count = (valid.sum(1) * F).clamp(min=1).float()  # (N,)
    # log of the mean power over valid frames and bins, (N,)
    level_ln = torch.logsumexp(masked.flatten(1), dim=1) - count.log()
    floor_ln = level_ln - below_db.to(device) / DB_PER_LN  # (N,)
    out_ln = torch.logaddexp(ln_power, floor_ln[:, None, None].expand_as(ln_power))
    return (out_ln / to_ln).to(dtype)
