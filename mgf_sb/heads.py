"""Small downstream heads: utterance pooling + classifier, frame probe, CTC head."""

import torch


def valid_mask(n_frames, T, device=None):
    """(B,) lengths -> (B, T) bool, True on valid frames."""
    return torch.arange(T, device=device)[None, :] < n_frames.to(device)[:, None]


class StatisticsPooling(torch.nn.Module):
    """Masked pooling over time: ``mean``, ``mean+std`` or ``attentive``.

    Arguments
    ---------
    input_size : int
    mode : str
        ``mean`` | ``mean+std`` | ``attentive`` (a learned softmax over frames,
        then weighted mean and std).
    """

    def __init__(self, input_size, mode="mean+std"):
        super().__init__()
        if mode not in ("mean", "mean+std", "attentive"):
            raise ValueError(f"pooling must be mean, mean+std or attentive, got {mode!r}")
        self.mode = mode
        self.attention = None
        if mode == "attentive":
            self.attention = torch.nn.Sequential(
                torch.nn.Linear(input_size, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1)
            )
        self.output_size = input_size if mode == "mean" else 2 * input_size

    def forward(self, x, n_frames):
        """(B, T, D), (B,) -> (B, output_size)."""
        mask = valid_mask(n_frames, x.shape[1], x.device)
        if self.attention is None:
            w = mask.to(x.dtype) / mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
        else:
            scores = self.attention(x).squeeze(-1).masked_fill(~mask, float("-inf"))
            w = torch.softmax(scores, dim=1)
        mean = torch.einsum("bt,btd->bd", w, x)
        if self.mode == "mean":
            return mean
        var = torch.einsum("bt,btd->bd", w, (x - mean[:, None]) ** 2)
        return torch.cat([mean, var.clamp(min=1e-8).sqrt()], -1)


class Classifier(torch.nn.Module):
    """Linear (``hidden_size=0``) or one-hidden-layer MLP classifier.

    Returns logits (B, n_classes).
    """

    def __init__(self, input_size, n_classes, hidden_size=0, dropout=0.0):
        super().__init__()
        if hidden_size:
            self.net = torch.nn.Sequential(
                torch.nn.Linear(input_size, hidden_size),
                torch.nn.ReLU(),
                torch.nn.Dropout(dropout),
                torch.nn.Linear(hidden_size, n_classes),
            )
        else:
            self.net = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(input_size, n_classes))

    def forward(self, x):
        return self.net(x)


class UtteranceClassifier(torch.nn.Module):
    """Pooling + classifier: (B, T, D), (B,) -> logits (B, n_classes)."""

    def __init__(self, input_size, n_classes, pooling="mean+std", hidden_size=0, dropout=0.0):
        super().__init__()
        self.pool = StatisticsPooling(input_size, pooling)
        self.classifier = Classifier(self.pool.output_size, n_classes, hidden_size, dropout)

    def forward(self, x, n_frames):
        return self.classifier(self.pool(x, n_frames))


class FrameProbe(torch.nn.Module):
    """Frame-wise linear probe: (B, T, D) -> logits (B, T, n_classes)."""

    def __init__(self, input_size, n_classes):
        super().__init__()
        self.linear = torch.nn.Linear(input_size, n_classes)

    def forward(self, x):
        return self.linear(x)


class CTCHead(torch.nn.Module):
    """CTC head: optional BiLSTM layers (SUPERB's ASR head), then a linear layer.

    Returns log-probabilities (B, T, n_tokens) for ``speechbrain.nnet.losses.ctc_loss``.
    """

    def __init__(self, input_size, n_tokens, lstm_layers=2, lstm_hidden=256, dropout=0.1):
        super().__init__()
        self.lstm = None
        size = input_size
        if lstm_layers > 0:
            self.lstm = torch.nn.LSTM(
                input_size, lstm_hidden, num_layers=lstm_layers, batch_first=True,
                bidirectional=True, dropout=dropout if lstm_layers > 1 else 0.0,
            )
            size = 2 * lstm_hidden
        self.dropout = torch.nn.Dropout(dropout)
        self.out = torch.nn.Linear(size, n_tokens)

    def forward(self, x, n_frames=None):
        if self.lstm is not None:
            if n_frames is not None:
                packed = torch.nn.utils.rnn.pack_padded_sequence(
                    x, n_frames.cpu().clamp(min=1), batch_first=True, enforce_sorted=False
                )
                out, _ = self.lstm(packed)
                x, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
            else:
                x, _ = self.lstm(x)
        return torch.log_softmax(self.out(self.dropout(x)), dim=-1)
