"""Full-batch logistic regression probes and pooled statistics (mgf_sb/probing.py)."""

import torch

from mgf_sb.probing import (
    accuracy, class_weights, context_stack, fit_logistic_regression, pooled_statistics,
    unweighted_accuracy,
)


def _blobs(n_per_class, n_classes=4, dim=6, spread=0.5, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g) * 3.0
    xs, ys = [], []
    for c, n in enumerate(n_per_class):
        xs.append(centres[c] + spread * torch.randn(n, dim, generator=g))
        ys.append(torch.full((n,), c, dtype=torch.long))
    x = torch.cat(xs)
    if scale is not None:  # badly scaled inputs: standardisation must cope
        x = x * scale
    return x, torch.cat(ys)


def test_separable_data_is_learned_and_generalises():
    scale = torch.tensor([1e3, 1e-3, 1.0, 50.0, 1.0, 1e2])
    x, y = _blobs([200] * 4, scale=scale)
    xt, yt = _blobs([100] * 4, seed=1, scale=scale)
    xt_, yt_ = _blobs([100] * 4, seed=0, scale=scale)  # same centres as training
    probe = fit_logistic_regression(x, y, 4)
    assert accuracy(probe.predict(x), y) == 1.0
    assert accuracy(probe.predict(xt_[:, :]), yt_) == 1.0
    p = probe.predict_proba(x)
    assert p.shape == (800, 4)
    assert torch.allclose(p.sum(-1), torch.ones(800), atol=1e-5)
    assert (p.argmax(-1) == probe.predict(x)).all()


def test_random_labels_stay_near_chance_on_new_data():
    g = torch.Generator().manual_seed(3)
    x, xt = torch.randn(2000, 10, generator=g), torch.randn(2000, 10, generator=g)
    y, yt = torch.randint(0, 5, (2000,), generator=g), torch.randint(0, 5, (2000,), generator=g)
    probe = fit_logistic_regression(x, y, 5)
    assert abs(accuracy(probe.predict(xt), yt) - 0.2) < 0.05


def test_class_balancing_raises_unweighted_accuracy_on_imbalanced_data():
    # overlapping classes, 95/5 imbalance: the plain fit favours the majority class
    g = torch.Generator().manual_seed(0)
    def draw(n0, n1):
        x = torch.cat([torch.randn(n0, 2, generator=g), torch.randn(n1, 2, generator=g) + 1.2])
        return x, torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])
    x, y = draw(1900, 100)
    xt, yt = draw(1000, 1000)
    plain = fit_logistic_regression(x, y, 2, class_balanced=False)
    balanced = fit_logistic_regression(x, y, 2, class_balanced=True)
    ua_plain = unweighted_accuracy(plain.predict(xt), yt)
    ua_bal = unweighted_accuracy(balanced.predict(xt), yt)
    assert ua_bal > ua_plain + 0.1, (ua_plain, ua_bal)
    assert ua_bal > 0.65


def test_fit_is_deterministic_and_l2_shrinks_weights():
    x, y = _blobs([50, 80, 30], n_classes=3, spread=2.0)
    a = fit_logistic_regression(x, y, 3)
    b = fit_logistic_regression(x.clone(), y.clone(), 3)
    assert torch.equal(a.linear.weight, b.linear.weight)
    assert torch.equal(a.linear.bias, b.linear.bias)
    strong = fit_logistic_regression(x, y, 3, l2=1.0)
    assert strong.linear.weight.norm() < 0.5 * a.linear.weight.norm()


def test_absent_class_is_never_predicted_and_weights_are_balanced():
    x, y = _blobs([40, 0, 60], n_classes=3)
    probe = fit_logistic_regression(x, y, 3)
    assert probe.n_classes == 3
    assert (probe.predict(x) != 1).all()
    w = class_weights(y, 3)
    assert w[1] == 0
    assert torch.isclose(w[0] * 40, w[2] * 60)  # each present class carries the same total weight


def test_accuracy_helpers():
    y = torch.tensor([0, 0, 0, 0, 1])
    pred = torch.zeros(5, dtype=torch.long)
    assert accuracy(pred, y) == 0.8
    assert unweighted_accuracy(pred, y) == 0.5
    assert unweighted_accuracy(y, y) == 1.0


def test_pooled_statistics_ignore_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 4, generator=g)
    n = torch.tensor([20, 7, 1])
    x_padded = x.clone()
    x_padded[1, 7:] = 1e6
    x_padded[2, 1:] = -1e6
    out = pooled_statistics(x_padded, n)
    assert out.shape == (3, 8)
    for b in range(3):
        v = x[b, : n[b]]
        assert torch.allclose(out[b, :4], v.mean(0), atol=1e-5)
        assert torch.allclose(out[b, 4:], v.std(0, unbiased=False).clamp(min=1e-4), atol=1e-4)


def test_context_stack_neighbours_and_edges():
    x = torch.arange(2 * 6, dtype=torch.float).reshape(2, 6, 1)
    n = torch.tensor([6, 3])
    s = context_stack(x, n, 2)
    assert s.shape == (2, 6, 5)
    assert s[0, 3].tolist() == [1, 2, 3, 4, 5]
    assert s[0, 0].tolist() == [0, 0, 0, 1, 2]       # left edge repeats the first frame
    assert s[1, 2].tolist() == [6, 7, 8, 8, 8]       # right edge repeats the last *valid* frame
    assert torch.equal(context_stack(x, n, 0), x)
