"""Convex probes: full-batch L2-regularised logistic regression, pooled statistics, accuracies.

One implementation shared by the quality benchmark (``benchmarks/quality.py``) and the
"convex reference" of the utterance-level recipes. A probe here has a unique optimum
(standardised inputs, L2 penalty, full-batch L-BFGS from zero weights), so its score measures
the features, not the luck of an SGD schedule, and it is deterministic for given inputs.

Typical use::

    from mgf_sb.probing import fit_logistic_regression, pooled_statistics, accuracy
    x_tr = pooled_statistics(feats_tr, n_frames_tr)          # (N, 2D)
    probe = fit_logistic_regression(x_tr, y_tr, n_classes)   # LogisticRegression
    acc = accuracy(probe.predict(pooled_statistics(feats_te, n_frames_te)), y_te)
"""

import torch


class LogisticRegression(torch.nn.Module):
    """A fitted multinomial logistic regression with its input standardisation baked in.

    ``logits = ((x - mean) / std) @ weight.T + bias``.

    Arguments
    ---------
    mean, std : torch.Tensor
        (D,) standardisation statistics of the training inputs.
    weight : torch.Tensor
        (C, D) weights on the standardised inputs.
    bias : torch.Tensor
        (C,) biases.
    """

    def __init__(self, mean, std, weight, bias):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    @property
    def n_classes(self):
        return self.linear.out_features

    def forward(self, x):
        """(N, D) -> logits (N, C)."""
        x = x.to(self.mean.dtype)
        return self.linear((x - self.mean) / self.std)

    @torch.no_grad()
    def predict_proba(self, x):
        """(N, D) -> class probabilities (N, C), rows sum to 1."""
        return torch.softmax(self.forward(x), dim=-1)

    @torch.no_grad()
    def predict(self, x):
        """(N, D) -> predicted class indices (N,) long."""
        return self.forward(x).argmax(-1)


def class_weights(y, n_classes):
    """Balanced class weights ``N / (C_present * n_c)``: (N,) long -> (n_classes,) float.

    Classes absent from ``y`` get weight 0 (they contribute nothing to the loss anyway).
    With these weights every present class carries the same total weight.
    """
    counts = torch.bincount(y.long(), minlength=n_classes).double()
    present = (counts > 0).sum().clamp(min=1)
    w = torch.where(counts > 0, y.numel() / (present * counts.clamp(min=1)), torch.zeros_like(counts))
    return w


def fit_logistic_regression(x_train, y_train, n_classes, l2=1e-4, class_balanced=True, max_iter=200,
                            tolerance=1e-7, dtype=torch.float32):
    """Fits a multinomial logistic regression on the whole training set at once.

    Minimises ``sum_i w_i CE(logits_i, y_i) / sum_i w_i + l2 / 2 * ||W||^2`` (bias not penalised)
    with L-BFGS (strong-Wolfe line search) from zero weights, on inputs standardised with the
    training mean and standard deviation (constant dimensions get std 1). The objective is convex
    and the start fixed, so the result is deterministic for given inputs.

    Arguments
    ---------
    x_train : torch.Tensor
        (N, D) float features.
    y_train : torch.Tensor
        (N,) long labels in [0, n_classes).
    n_classes : int
        Number of classes C (may exceed the labels present).
    l2 : float
        L2 penalty on the weights (on the standardised scale).
    class_balanced : bool
        Weight each sample by ``N / (C_present * n_class)`` so that every class present counts
        equally (raises the unweighted accuracy on imbalanced data); False: plain mean.
    max_iter : int
        Maximum L-BFGS iterations.
    tolerance : float
        Gradient / change tolerance of L-BFGS.
    dtype : torch.dtype
        Computation precision (float32 is enough for standardised inputs; float64 for tiny sets).

    Returns
    -------
    LogisticRegression
        Module with ``.predict(x)`` (N,) and ``.predict_proba(x)`` (N, C), in eval mode.
    """
    x = torch.as_tensor(x_train).detach().to(dtype)
    y = torch.as_tensor(y_train).detach().long().reshape(-1)
    if x.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need x (N, D) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("cannot fit a probe on an empty training set")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes}), got [{int(y.min())}, {int(y.max())}]")
    if not torch.isfinite(x).all():
        raise ValueError("x_train holds NaN or Inf")
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std > 1e-6 * std.max().clamp(min=1e-12), std, torch.ones_like(std))
    z = (x - mean) / std
    if class_balanced:
        sample_w = class_weights(y, n_classes).to(dtype)[y]
    else:
        sample_w = torch.ones(y.shape[0], dtype=dtype)
    sample_w = sample_w / sample_w.sum()

    D = x.shape[1]
    weight = torch.zeros(n_classes, D, dtype=dtype, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=10,
        tolerance_grad=tolerance, tolerance_change=tolerance * 1e-2, line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        logits = torch.addmm(bias, z, weight.t())
        ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        loss = (ce * sample_w).sum() + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    model = LogisticRegression(mean, std, weight.detach(), bias.detach())
    return model.eval()


def accuracy(pred, y):
    """Share of correct predictions: (N,), (N,) -> float in [0, 1]."""
    pred, y = torch.as_tensor(pred).reshape(-1), torch.as_tensor(y).reshape(-1)
    if y.numel() == 0:
        return float("nan")
    return (pred == y).double().mean().item()


def unweighted_accuracy(pred, y, n_classes=None):
    """Mean per-class recall over the classes present in ``y`` (IEMOCAP's "UA").

    (N,), (N,) -> float in [0, 1]. Chance level is 1 / (classes present) whatever the imbalance.
    """
    pred, y = torch.as_tensor(pred).reshape(-1).long(), torch.as_tensor(y).reshape(-1).long()
    if y.numel() == 0:
        return float("nan")
    C = int(n_classes) if n_classes is not None else int(max(y.max(), pred.max())) + 1
    total = torch.bincount(y, minlength=C).double()
    correct = torch.bincount(y[pred == y], minlength=C).double()
    present = total > 0
    return (correct[present] / total[present]).mean().item()


def pooled_statistics(x, n_frames=None):
    """Mean and standard deviation over the valid frames of each sequence.

    Arguments
    ---------
    x : torch.Tensor
        (B, T, D) padded frame features.
    n_frames : torch.Tensor, optional
        (B,) number of valid frames (all T when omitted); padding is ignored.

    Returns
    -------
    torch.Tensor
        (B, 2D): ``[mean, std]`` (population std; the variance is floored at 1e-8 before the
        square root). A sequence with 0 valid frames gives mean 0 and std 1e-4.
    """
    B, T, _ = x.shape
    if n_frames is None:
        n_frames = torch.full((B,), T, dtype=torch.long)
    mask = (torch.arange(T, device=x.device)[None, :] < n_frames.to(x.device)[:, None]).to(x.dtype)
    count = mask.sum(1, keepdim=True).clamp(min=1)
    mean = torch.einsum("bt,btd->bd", mask, x) / count
    var = torch.einsum("bt,btd->bd", mask, (x - mean[:, None]) ** 2) / count
    return torch.cat([mean, var.clamp(min=1e-8).sqrt()], dim=-1)


def context_stack(x, n_frames, context):
    """Concatenates each frame with its ``context`` neighbours on both sides (edge-padded).

    Arguments
    ---------
    x : torch.Tensor
        (B, T, D) frame features.
    n_frames : torch.Tensor
        (B,) valid lengths; neighbours beyond a sequence's end repeat its last valid frame.
    context : int
        Frames on each side (``context=5``: 11 frames, "fbank ±5").

    Returns
    -------
    torch.Tensor
        (B, T, (2 * context + 1) * D), offsets ordered -context..+context.
    """
    if context <= 0:
        return x
    B, T, _ = x.shape
    t = torch.arange(T, device=x.device)
    last = (n_frames.to(x.device) - 1).clamp(min=0)
    out = []
    for off in range(-context, context + 1):
        idx = (t[None, :] + off).clamp(min=0)
        idx = torch.minimum(idx, last[:, None])  # (B, T)
        out.append(torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2])))
    return torch.cat(out, dim=-1)
