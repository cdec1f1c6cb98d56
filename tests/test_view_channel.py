"""Random log-Mel channel (mgf_sb.view_channel): EQ smooth and bounded, gain uniform,
noise floor in the power domain, rows independent, a fixed generator reproduces."""

import math

import pytest
import torch

from mgf_sb.view_channel import eq_curves, random_log_mel_channel


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_eq_curve_smooth_bounded_and_through_its_range():
    x = torch.full((400, 3, 80), 50.0)
    y = random_log_mel_channel(x, eq_db=3.0, gain_db=0.0, noise_floor_db=None, generator=_gen())
    curve = y - x  # (N, T, F): the EQ alone, the same on every frame of a row
    assert torch.allclose(curve[:, 0], curve[:, 2])
    curve = curve[:, 0]
    assert curve.abs().max() <= 3.0 + 1e-4
    # it uses its range: some rows reach near the bounds
    assert curve.max() > 2.7 and curve.min() < -2.7
    # smooth: adjacent bins differ by far less than the ±3 dB range (80 bins, 5 segments of 16 bins:
    # a full 6 dB swing per segment under cosine easing moves at most 6 * pi / 2 / 16 ≈ 0.6 dB per bin)
    step = curve.diff(dim=1).abs()
    assert step.max() < 0.65
    assert step.mean() < 0.25
    # and curved, not a constant offset: the spread within a row is comparable to the range
    assert (curve.max(1).values - curve.min(1).values).mean() > 2.0


def test_eq_curve_hits_its_knots():
    g = _gen(3)
    knots = -3.0 + 6.0 * torch.rand((5, 6), generator=g)
    curve = eq_curves(5, 81, n_knots=6, eq_db=3.0, generator=_gen(3))
    # 81 bins, 6 knots: a knot on every 16th bin
    assert torch.allclose(curve[:, ::16], knots, atol=1e-5)


def test_gain_uniform_within_range_and_flat_over_bins():
    x = torch.full((4000, 2, 40), 60.0)
    y = random_log_mel_channel(x, eq_db=0.0, gain_db=3.0, noise_floor_db=None, generator=_gen(1))
    d = y - x
    g = d[:, 0, 0]
    assert torch.allclose(d, g[:, None, None].expand_as(d), atol=1e-4)  # one gain per row
    assert g.abs().max() <= 3.0 + 1e-4
    # uniform on [-3, 3]: mean 0, variance 3, each sixth of the range holds about a sixth
    assert abs(g.mean().item()) < 0.1
    assert abs(g.var().item() - 3.0) < 0.2
    hist = torch.histc(g, bins=6, min=-3.0, max=3.0) / g.numel()
    assert (hist - 1 / 6).abs().max() < 0.03


def test_rows_get_independent_channels():
    # identical rows in, different channels out; the curves of two rows are uncorrelated
    x = torch.full((2000, 1, 80), 50.0)
    y = random_log_mel_channel(x, noise_floor_db=None, generator=_gen(2))
    d = (y - x)[:, 0]
    assert (d[1:] - d[:-1]).abs().amax(1).min() > 0  # no two neighbouring rows alike
    # correlation between row i and row i+1 of the per-row mean offset and of the tilt
    mean = d.mean(1)
    tilt = d[:, -10:].mean(1) - d[:, :10].mean(1)
    for v in (mean, tilt):
        r = torch.corrcoef(torch.stack([v[:-1], v[1:]]))[0, 1]
        assert abs(r) < 0.1, r


def test_noise_floor_raises_quiet_bins_and_spares_loud_ones():
    # half the bins loud (80 dB), half very quiet (0 dB); mean power ~ 77 dB
    x = torch.zeros(500, 20, 40)
    x[:, :, :20] = 80.0
    y = random_log_mel_channel(x, eq_db=0.0, gain_db=0.0, noise_floor_db=(30.0, 50.0), generator=_gen(4))
    level = 10 * math.log10(0.5 * 1e8)  # the rows' level, dB
    loud, quiet = (y - x)[:, :, :20], y[:, :, 20:]
    assert loud.abs().max() < 0.05  # at most 10 log10(1 + 10^-2.7) ≈ 0.009 dB above a 80 dB bin
    # the quiet bins rise to the floor: 30-50 dB below the level, flat over bins and frames
    floor = quiet[:, 0, 0]
    assert torch.allclose(quiet, floor[:, None, None].expand_as(quiet), atol=1e-3)
    below = level - floor
    assert below.min() >= 30.0 - 1e-3 and below.max() <= 50.0 + 1e-3
    assert below.min() < 32.0 and below.max() > 48.0  # the whole range is drawn
    assert (quiet > x[:, :, 20:] + 20.0).all()


def test_noise_floor_in_power_domain_and_natural_log_units():
    # a bin exactly at the floor gains 10 log10(2) ≈ 3.01 dB: addition in power, not in log
    x = torch.full((1, 1, 1), 40.0)
    # one bin: the level is the bin itself; put the floor 0 dB below it
    y = random_log_mel_channel(x, eq_db=0.0, gain_db=0.0, noise_floor_db=(0.0, 0.0))
    assert abs((y - x).item() - 10 * math.log10(2.0)) < 1e-4
    # the same in natural-log units: + ln 2
    x_ln = x * math.log(10.0) / 10.0
    y_ln = random_log_mel_channel(x_ln, eq_db=0.0, gain_db=0.0, noise_floor_db=(0.0, 0.0), log_units="ln")
    assert abs((y_ln - x_ln).item() - math.log(2.0)) < 1e-5
    # and the EQ/gain are the same number of dB whatever the units
    a = random_log_mel_channel(x.expand(3, 4, 8).clone(), noise_floor_db=None, generator=_gen(5))
    b = random_log_mel_channel(x_ln.expand(3, 4, 8).clone(), noise_floor_db=None, generator=_gen(5),
                               log_units="ln")
    assert torch.allclose(a - 40.0, (b - x_ln.item()) * 10.0 / math.log(10.0), atol=1e-4)


def test_level_ignores_padding_frames():
    x = torch.full((2, 10, 8), 60.0)
    x[:, 5:] = -100.0  # padding, far below
    n = torch.tensor([5, 5])
    y = random_log_mel_channel(x, eq_db=0.0, gain_db=0.0, noise_floor_db=(30.0, 30.0), n_frames=n)
    # the floor sits 30 dB below the valid frames' level (60 dB), not below a level pulled down by padding
    assert torch.allclose(y[:, 5:], torch.full_like(y[:, 5:], 30.0), atol=1e-3)


def test_fixed_generator_reproduces_and_seeds_differ():
    x = 40.0 + 10.0 * torch.randn(8, 30, 80, generator=_gen(9))
    a = random_log_mel_channel(x, generator=_gen(7))
    b = random_log_mel_channel(x, generator=_gen(7))
    c = random_log_mel_channel(x, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype


def test_bad_inputs():
    with pytest.raises(ValueError):
        random_log_mel_channel(torch.zeros(3, 80))
    with pytest.raises(ValueError):
        random_log_mel_channel(torch.zeros(1, 3, 80), log_units="log10")
    with pytest.raises(ValueError):
        eq_curves(2, 80, n_knots=1)
