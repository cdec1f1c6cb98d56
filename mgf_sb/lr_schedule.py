"""The pretraining learning-rate schedule, kept as one schedule across resumes.

SpeechBrain's :class:`~speechbrain.nnet.schedulers.WarmAndExpDecayLRSchedule`
restores its whole state from a checkpoint, step counts included. A run
resumed with a larger ``number_of_epochs`` then kept the old total (the decay
ended early, below its end point) while the EMA teacher's ramp followed the
new one: two schedules. Here the step counts are the ones resolved for *this*
run (``recipes/pretrain/train.py``'s ``resolve_schedule``, from the data and
the current ``number_of_epochs``); a checkpoint restores only the position
(``current_step``) on that schedule. :meth:`WarmAndExpDecay.retarget` moves the
end point when the recipe learns the real number of steps per epoch (shards).
"""

import logging

import torch
from speechbrain.nnet.schedulers import WarmAndExpDecayLRSchedule
from speechbrain.utils.checkpoints import mark_as_loader, register_checkpoint_hooks

logger = logging.getLogger(__name__)


@register_checkpoint_hooks
class WarmAndExpDecay(WarmAndExpDecayLRSchedule):
    """Linear warm-up to ``lr``, then exponential decay to ``lr * decay_factor`` at ``total_steps``.

    The same curve as SpeechBrain's class (and the same checkpoint file); on
    load only ``current_step`` is taken from the checkpoint.

    Arguments
    ---------
    lr : float
    n_warmup_steps : int
    total_steps : int
    decay_factor : float
    """

    def __init__(self, lr, n_warmup_steps, total_steps, decay_factor=0.1):
        super().__init__(lr, n_warmup_steps, total_steps, decay_factor)
        self.resumed_from = None  # (saved step, saved total) after a load

    @property
    def total_steps(self):
        return self.n_warmup_steps + self.decay_steps

    def lr_at(self, step):
        """The learning rate set before optimiser step ``step`` (0-based)."""
        if step < self.n_warmup_steps:
            return self.base_lr * step / self.n_warmup_steps
        return min(self.base_lr, self.base_lr * self.decay_factor ** ((step - self.n_warmup_steps) / self.decay_steps))

    def retarget(self, n_warmup_steps, total_steps):
        """New step counts; the position (``current_step``) is kept."""
        if not 0 <= n_warmup_steps < total_steps:
            raise ValueError(f"lr warm-up of {n_warmup_steps} steps does not fit in {total_steps} total steps")
        self.n_warmup_steps, self.decay_steps = int(n_warmup_steps), int(total_steps) - int(n_warmup_steps)

    @mark_as_loader
    def load(self, path, end_of_epoch=False, device=None):
        """Restores the position only; the step counts stay this run's."""
        del end_of_epoch, device
        data = torch.load(path, weights_only=True)
        saved_total = int(data["n_warmup_steps"]) + int(data["decay_steps"])
        self.current_step = int(data["current_step"])
        self.resumed_from = (self.current_step, saved_total)
        if saved_total != self.total_steps:
            logger.info(f"lr schedule: resumed at step {self.current_step}; the checkpoint's schedule had "
                        f"{saved_total} steps, this run's has {self.total_steps} (lr_warmup_steps="
                        f"{self.n_warmup_steps}): the decay follows the new total, as the EMA ramp does")
