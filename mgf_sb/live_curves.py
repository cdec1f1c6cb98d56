"""Live curves: ``--use_tensorboard=True`` on any recipe also writes TensorBoard events.

Every recipe logs its epoch statistics through ``hparams.train_logger`` (SpeechBrain's
``FileTrainLogger``: ``train_log.txt``). With ``use_tensorboard: True`` in the YAML (or
``--use_tensorboard=True``), :func:`attach_tensorboard` -- called once when the recipe's
Brain is built (``DownstreamBrain`` for the four probes, ``MGFBrain`` for pretraining) --
puts a :class:`TeeTrainLogger` in its place: the same statistics still go to
``train_log.txt`` and also, as SpeechBrain ``TensorboardLogger`` events, to
``tensorboard_folder`` (``<output_folder>/tensorboard`` by default):

- ``<stat>/train``, ``<stat>/valid``, ``<stat>/test``: every numeric statistic the recipe
  logs (the loss and each scale's loss and contrastive accuracy in pretraining; the loss
  and the task's metrics in the probes), one point per epoch;
- the numeric ``stats_meta`` entries (``lr``, pretraining's ``step``);
- ``layer_weight/<i>``: the softmax weight of layer ``i`` the probe has learned (SUPERB
  weighted sum), when the Brain gives them.

The x axis is the epoch, so a resumed run continues its curves instead of restarting
them. ``tensorboard`` is an optional dependency (``pip install -e ".[tensorboard]"``);
asking for it without the package is an error that says so.

    tensorboard --logdir results/    # then open http://localhost:6006
"""

import math
import os

from speechbrain.utils.distributed import main_process_only
from speechbrain.utils.train_logger import TensorboardLogger, TrainLogger

MISSING_MESSAGE = ('--use_tensorboard=True needs the "tensorboard" package, which is not installed: '
                   'pip install -e ".[tensorboard]" (or pip install tensorboard), or run without '
                   "--use_tensorboard")


def _scalar(value):
    """A finite float, or None for anything that is not a number (strings, lists, None, bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class EpochTensorboardLogger(TensorboardLogger):
    """SpeechBrain's ``TensorboardLogger`` with the epoch as the x axis.

    SpeechBrain's logger counts its own calls (a resumed run starts again at 1) and
    writes every ``stats_meta`` value as a scalar (a string fails); this one takes the
    step from ``stats_meta["epoch"]`` (or ``"Epoch loaded"`` for a test line), skips
    non-numeric entries, writes ``extra`` scalars (e.g. layer weights) at the same step,
    and flushes after each call so that short runs leave complete event files.

    Arguments
    ---------
    save_dir : str
        The event folder.
    """

    @main_process_only
    def log_stats(self, stats_meta, train_stats=None, valid_stats=None, test_stats=None, verbose=False,
                  extra=None):
        self.global_step["meta"] += 1
        step = None
        for key in ("epoch", "Epoch loaded"):
            if _scalar(stats_meta.get(key)) is not None:
                step = int(_scalar(stats_meta[key]))
                break
        step = self.global_step["meta"] if step is None else step
        for name, value in stats_meta.items():
            v = _scalar(value)
            if v is not None and name not in ("epoch", "Epoch loaded"):
                self.writer.add_scalar(name, v, step)
        for dataset, stats in (("train", train_stats), ("valid", valid_stats), ("test", test_stats)):
            for name, value in (stats or {}).items():
                values = value if isinstance(value, list) else [value]
                v = _scalar(values[-1]) if values else None  # a per-batch list: its last value
                if v is not None:
                    self.writer.add_scalar(f"{name}/{dataset}", v, step)
        for name, value in (extra or {}).items():
            v = _scalar(value)
            if v is not None:
                self.writer.add_scalar(name, v, step)
        self.writer.flush()


class TeeTrainLogger(TrainLogger):
    """Sends every ``log_stats`` call to the recipe's file logger and to TensorBoard.

    Arguments
    ---------
    file_logger : speechbrain.utils.train_logger.TrainLogger
        The recipe's own logger (``train_log.txt``), called first and unchanged.
    tensorboard : EpochTensorboardLogger
    extra_scalars : callable, optional
        Called at each ``log_stats``; returns ``{tag: number}`` written at the same step
        (e.g. the layer weights learned so far).
    """

    def __init__(self, file_logger, tensorboard, extra_scalars=None):
        self.file_logger, self.tensorboard, self.extra_scalars = file_logger, tensorboard, extra_scalars

    def log_stats(self, stats_meta, train_stats=None, valid_stats=None, test_stats=None, verbose=True):
        self.file_logger.log_stats(stats_meta, train_stats=train_stats, valid_stats=valid_stats,
                                   test_stats=test_stats, verbose=verbose)
        extra = self.extra_scalars() if self.extra_scalars is not None else None
        self.tensorboard.log_stats(stats_meta, train_stats, valid_stats, test_stats, extra=extra)

    def __getattr__(self, name):  # e.g. FileTrainLogger.save_file
        if name in ("file_logger", "tensorboard", "extra_scalars"):
            raise AttributeError(name)
        return getattr(self.file_logger, name)


def layer_weight_scalars(weights):
    """``[0.1, 0.9]`` -> ``{"layer_weight/00": 0.1, "layer_weight/01": 0.9}`` (None -> {})."""
    return {f"layer_weight/{i:02d}": float(w) for i, w in enumerate(weights or [])}


def attach_tensorboard(brain, extra_scalars=None):
    """With ``hparams.use_tensorboard``: tees ``hparams.train_logger`` into TensorBoard events.

    Arguments
    ---------
    brain : speechbrain.Brain
        Its ``hparams`` need ``train_logger``, ``use_tensorboard`` (absent = False) and
        ``tensorboard_folder`` (absent: ``<output_folder>/tensorboard``).
    extra_scalars : callable, optional
        See :class:`TeeTrainLogger`.

    Returns
    -------
    EpochTensorboardLogger or None
        None when ``use_tensorboard`` is off (nothing changes then).

    Raises
    ------
    ImportError
        ``use_tensorboard`` is on and the ``tensorboard`` package is missing.
    """
    hp = brain.hparams
    if not getattr(hp, "use_tensorboard", False):
        return None
    if isinstance(hp.train_logger, TeeTrainLogger):  # already attached (same hparams, second Brain)
        return hp.train_logger.tensorboard
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise ImportError(MISSING_MESSAGE) from e
    folder = getattr(hp, "tensorboard_folder", None) or os.path.join(hp.output_folder, "tensorboard")
    logger = EpochTensorboardLogger(folder)
    hp.train_logger = TeeTrainLogger(hp.train_logger, logger, extra_scalars)
    return logger
