"""What a run prints per epoch: the full line in ``train_log.txt``, a short one on the console.

SpeechBrain's ``FileTrainLogger`` writes every statistic of an epoch to ``train_log.txt`` and logs
the same line to the console; a pretraining epoch is then ~1,500 characters of 30+ keys, and its
numbers are in e-notation outside (1, 100) (a WER of 100 reads ``1.00e+02``).

- :func:`readable_numbers` makes a recipe's ``FileTrainLogger`` write plain numbers where they are
  readable (``100.0``, ``0.167``, ``2.13``; e-notation only below 0.01 or from 100,000 on), still
  parseable by ``float``;
- :func:`pretraining_summary` is the pretraining's short console line: each scale's loss, the
  phoneme student's accuracy minus its context-only baseline, the lr.
"""

import math

from speechbrain.utils.train_logger import FileTrainLogger

SCALES = ("frame", "phoneme", "word", "utterance", "bestrq", "wav2vec2")


def plain_number(value, precision=2):
    """A float as a readable, ``float``-parseable string.

    Example
    -------
    >>> [plain_number(v) for v in (100.0, 1.6667, 0.16667, 0.025, 0.002, 123456.0, 0.0)]
    ['100.0', '1.67', '0.167', '0.0250', '2.00e-03', '1.23e+05', '0']
    """
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    a = abs(value)
    if 100 <= a < 1e5:
        return f"{value:.1f}"
    if 1 <= a < 100:
        return f"{value:.{precision}f}"
    if 0.1 <= a < 1:
        return f"{value:.{precision + 1}f}"
    if 0.01 <= a < 0.1:
        return f"{value:.{precision + 2}f}"
    return f"{value:.{precision}e}"


class ReadableTrainLogger(FileTrainLogger):
    """SpeechBrain's ``FileTrainLogger`` with :func:`plain_number` formatting."""

    def _item_to_string(self, key, value, dataset=None):
        if isinstance(value, float):
            value = plain_number(value, self.precision)
        if dataset is not None:
            key = f"{dataset} {key}"
        return f"{key}: {value}"


def readable_numbers(hparams):
    """Switches the YAML's ``train_logger`` (a plain ``FileTrainLogger``) to :class:`ReadableTrainLogger`."""
    log = hparams.get("train_logger") if hasattr(hparams, "get") else None
    if type(log) is FileTrainLogger:
        log.__class__ = ReadableTrainLogger
    return hparams


def pretraining_summary(epoch, epochs, lr, train, valid):
    """The short console line of a pretraining epoch (``train_log.txt`` keeps every key).

    Example
    -------
    >>> pretraining_summary(3, 20, 0.0019, {"loss": 2.5, "frame": 0.81, "phoneme": 2.31,
    ...     "phoneme_acc": 0.42, "phoneme_context_acc": 0.30, "phoneme_interp_acc": 0.25}, {"loss": 2.4})
    'epoch 3/20: train loss 2.50 (frame 0.810, phoneme 2.31), valid loss 2.40; phoneme acc 0.420 vs context baseline 0.300 (+0.120), vs no network 0.250 (+0.170); lr 1.90e-03'
    """
    scales = ", ".join(f"{s} {plain_number(float(train[s]))}" for s in SCALES if s in train)
    line = f"epoch {epoch}/{epochs}: train loss {plain_number(float(train['loss']))}"
    if scales:
        line += f" ({scales})"
    if valid and "loss" in valid:
        line += f", valid loss {plain_number(float(valid['loss']))}"
    if "phoneme_acc" in train and "phoneme_context_acc" in train:
        acc, base = float(train["phoneme_acc"]), float(train["phoneme_context_acc"])
        line += f"; phoneme acc {plain_number(acc)} vs context baseline {plain_number(base)} ({acc - base:+.3f})"
        if "phoneme_interp_acc" in train:  # the neighbours' targets, no network (docs/method.md)
            interp = float(train["phoneme_interp_acc"])
            line += f", vs no network {plain_number(interp)} ({acc - interp:+.3f})"
    return line + f"; lr {plain_number(float(lr))}"
