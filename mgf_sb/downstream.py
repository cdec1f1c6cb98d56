"""What every downstream recipe shares: the Brain base, optimisers, notices.

A recipe subclasses :class:`DownstreamBrain`, declares ``upstream``,
``layer_selector`` and its head in YAML, and implements ``compute_forward`` /
``compute_objectives`` / ``on_stage_end`` with ``self.encode(...)``.

Every probe trains to convergence the same way (all in each task's YAML):

- ``lr_annealing``: SpeechBrain's ``ReduceLROnPlateau`` on the dev error, which
  multiplies the head's lr by ``lr_annealing_factor`` after ``lr_patience``
  epochs without improvement and never goes below ``lr * lr_floor``;
- ``epoch_counter``: SpeechBrain's ``EpochCounterWithStopper``, which stops
  after ``early_stop_patience`` epochs without dev improvement (early stopping)
  or at ``number_of_epochs``;
- the utterance classification tasks weight the cross-entropy by inverse class
  frequency (``class_balanced_loss``, :func:`balanced_class_weights`).

:meth:`DownstreamBrain.anneal_and_stop` applies the first two once per validation.
"""

import json
import logging
import os

import speechbrain as sb
import torch

from mgf_sb.distributed import CPUFriendlyDDP, unwrap
from mgf_sb.finished import counter_state, training_done
from mgf_sb.live_curves import attach_tensorboard, layer_weight_scalars
from mgf_sb.probing import class_weights, fit_logistic_regression, pooled_statistics

logger = logging.getLogger(__name__)


class DownstreamBrain(CPUFriendlyDDP, sb.Brain):
    """Brain with an upstream (frozen or fine-tuned) and a layer selector.

    Expects ``modules.upstream`` (:class:`~mgf_sb.upstream.Upstream`) and
    ``modules.layer_selector`` (:class:`~mgf_sb.upstream.LayerSelector`); the
    head optimiser comes from ``opt_class``, the fine-tuned upstream's from
    ``hparams.upstream_opt_class`` (only when ``freeze`` is False).
    With ``use_tensorboard: True`` the epoch statistics and the learned layer weights
    also go to TensorBoard (:mod:`mgf_sb.live_curves`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        attach_tensorboard(self, lambda: layer_weight_scalars(self.layer_weights()))

    def compute_forward(self, batch, stage):
        """Upstream -> layer selector -> ``modules.head(feats, n_frames)``.

        What the utterance-level recipes (IEMOCAP, VoxCeleb1) need as is;
        frame-level recipes override it.
        """
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        feats, n_frames = self.encode(wavs, wav_lens, stage)
        return self.modules.head(feats, n_frames)

    def encode(self, wavs, wav_lens, stage):
        """Waveforms -> (B, T, D) features for the head, and (B,) valid frames."""
        layers, n_frames = self.modules.upstream(wavs, wav_lens, update_stats=stage == sb.Stage.TRAIN)
        return self.modules.layer_selector(layers), n_frames

    def init_optimizers(self):
        upstream = unwrap(self.modules.upstream)  # DDP-wrapped when fine-tuned under torchrun
        up_params = {id(p) for p in upstream.parameters()}
        head_params = [p for p in self.modules.parameters() if id(p) not in up_params and p.requires_grad]
        self.optimizer = self.opt_class(head_params)
        self.optimizers_dict = {"model": self.optimizer}
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)
        trainable_up = [p for p in upstream.parameters() if p.requires_grad]
        if not getattr(upstream, "freeze", True) and trainable_up:
            self.upstream_optimizer = self.hparams.upstream_opt_class(trainable_up)
            self.optimizers_dict["upstream"] = self.upstream_optimizer
            if self.checkpointer is not None:
                self.checkpointer.add_recoverable("upstream_optimizer", self.upstream_optimizer)

    def on_fit_start(self):
        """SpeechBrain's (recovers the last kept checkpoint); then, when the run finished training
        earlier (:mod:`mgf_sb.finished`: a rerun that evaluates again), trains no more epochs: the kept
        checkpoint is the best dev one, whose epoch counter predates early stopping."""
        super().on_fit_start()
        self.dev_errors = []
        if training_done(vars(self.hparams)):
            counter = self.hparams.epoch_counter
            counter.current = max(counter.current, counter.limit) if not hasattr(counter, "should_stop") \
                else counter.current
            if hasattr(counter, "should_stop"):
                counter.should_stop = True
            logger.info("training finished earlier: evaluating only")

    def fit(self, epoch_counter, train_set, valid_set=None, *args, **kwargs):
        """SpeechBrain's fit; then says when the dev set could not select an epoch
        (:meth:`dev_selection_note`)."""
        try:
            self.n_dev = len(valid_set)
        except TypeError:
            self.n_dev = None
        result = super().fit(epoch_counter, train_set, valid_set, *args, **kwargs)
        self.fit_state = counter_state(epoch_counter)  # evaluate() reloads an earlier counter with the best checkpoint
        note = self.dev_selection_note()
        if note:
            logger.warning(note)  # SpeechBrain's handlers: the console and log.txt
        return result

    def dev_selection_note(self):
        """A warning when the dev metric was the same in every epoch of this process's training
        (e.g. at chance on a tiny dev set): early stopping and the best-checkpoint choice then keep
        whichever epoch came first or last, not the best one. None otherwise."""
        errors = getattr(self, "dev_errors", [])
        if len(errors) < 2 or max(errors) - min(errors) > 1e-9:
            return None
        n_dev = getattr(self, "n_dev", None)
        size = f" ({n_dev} items)" if n_dev else ""
        return (f"dev set too small to select on{size}: its error was {errors[0]:.4f} in all {len(errors)} "
                f"epochs, so the 'best' checkpoint is arbitrary and early stopping measures nothing; "
                f"use a larger dev set for model selection")

    def on_evaluate_start(self, max_key=None, min_key=None):
        super().on_evaluate_start(max_key=max_key, min_key=min_key)
        if not unwrap(self.modules.upstream).statistics_ready():
            raise RuntimeError(
                "the upstream has no feature-normalisation statistics: train at least one epoch "
                "(or give a pretrained folder as upstream / upstream_reference) before evaluating"
            )

    def layer_weights(self):
        """The learned layer weights (list) or None for a fixed layer."""
        return self.hparams.layer_selector.normalized_weights()

    def anneal_and_stop(self, dev_error):
        """Once per validation: lr schedule with a floor, then early stopping.

        Arguments
        ---------
        dev_error : float
            The dev metric, lower is better (``1 - accuracy``, ``1 - UA``, WER...).

        Returns
        -------
        float
            The head's lr used during the epoch that just ended (for the log).
        """
        old_lr = self.optimizer.param_groups[0]["lr"]
        if not hasattr(self, "dev_errors"):
            self.dev_errors = []
        self.dev_errors.append(float(dev_error))
        epoch = self.hparams.epoch_counter.current
        _, new_lr = self.hparams.lr_annealing([self.optimizer], epoch, float(dev_error))
        sb.nnet.schedulers.update_learning_rate(self.optimizer, new_lr)
        if hasattr(self.hparams.epoch_counter, "update_metric"):
            self.hparams.epoch_counter.update_metric(float(dev_error))
        return old_lr

    @torch.no_grad()
    def pooled_features(self, dataset, label_fn, batch_size=8, num_workers=0):
        """Mean+std pooled features of the probe's layer mix over a dataset (eval mode).

        The layers are combined by ``layer_selector`` as trained with the probe
        (the learned weighted sum, or the fixed ``layer``), then pooled over the
        valid frames (:func:`mgf_sb.probing.pooled_statistics`).

        Returns
        -------
        x : torch.Tensor
            (N, 2D) float32, on the CPU.
        y : torch.Tensor
            (N,) long, ``label_fn(batch)`` of each batch.
        """
        upstream, selector = unwrap(self.modules.upstream), unwrap(self.modules.layer_selector)
        upstream.eval()
        selector.eval()
        loader = sb.dataio.dataloader.make_dataloader(dataset, batch_size=batch_size, num_workers=num_workers)
        xs, ys = [], []
        for batch in loader:
            batch = batch.to(self.device)
            layers, n_frames = upstream(*batch.sig, update_stats=False)
            xs.append(pooled_statistics(selector(layers).float(), n_frames).cpu())
            ys.append(label_fn(batch).view(-1).cpu())
        return torch.cat(xs), torch.cat(ys)

    def convex_reference(self, train_set, test_set, label_fn, n_classes, l2=1e-4, batch_size=8, num_workers=0):
        """Full-batch logistic regression on the same pooled features as the probe.

        Fits :func:`mgf_sb.probing.fit_logistic_regression` (class-balanced, L2
        ``l2``) on the mean+std pooled statistics of ``train_set`` (whole
        utterances) and predicts ``test_set``: a convex reference that shows
        whether the probe is under-trained. Call it after ``evaluate`` (the best
        checkpoint's layer weights are loaded).

        Returns
        -------
        dict
            ``pred`` and ``target`` (N_test,) long tensors, ``n_train``, ``l2`` and
            ``features`` (a description of the features).
        """
        x_train, y_train = self.pooled_features(train_set, label_fn, batch_size, num_workers)
        x_test, y_test = self.pooled_features(test_set, label_fn, batch_size, num_workers)
        model = fit_logistic_regression(x_train, y_train, n_classes, l2=l2, class_balanced=True)
        layer = self.hparams.layer_selector.layer
        mix = "the learned weighted sum of the layers" if layer is None else f"layer {layer}"
        return {
            "pred": model.predict(x_test), "target": y_test, "n_train": int(x_train.shape[0]), "l2": float(l2),
            "features": f"mean+std over time of {mix} (as trained with the probe); "
                        f"full-batch class-balanced L2 logistic regression",
        }


def announce_data(data_folder, sample_folder_name="samples"):
    """Says loudly when a recipe runs on a bundled sample instead of a real corpus."""
    if sample_folder_name in os.path.normpath(data_folder).split(os.sep):
        msg = (f"USING THE BUNDLED SAMPLE CORPUS at {data_folder} (synthetic speech, a smoke test). "
               f"Pass --data_folder=/path/to/the/real/corpus for real results.")
        logger.warning("=" * 20 + " " + msg + " " + "=" * 20)  # SpeechBrain's handlers: console + log.txt, once
        return True
    return False


def balanced_class_weights(labels, n_classes, balanced=True):
    """Cross-entropy class weights ``N / (C_present * n_c)`` (mean 1 over utterances) or None.

    Arguments
    ---------
    labels : sequence of int
        Every training utterance's class index.
    n_classes : int
    balanced : bool
        False: None (plain cross-entropy).

    Example
    -------
    >>> [round(w, 3) for w in balanced_class_weights([0, 0, 0, 1], 3).tolist()]
    [0.667, 2.0, 0.0]
    """
    if not balanced:
        return None
    return class_weights(torch.as_tensor(list(labels), dtype=torch.long), n_classes).float()


def write_results(folder, name, results, markdown=None):
    """Writes ``<name>.json`` and, if given, ``<name>.md`` into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    if markdown is not None:
        with open(os.path.join(folder, f"{name}.md"), "w") as f:
            f.write(markdown)
    logger.info(f"results written to {os.path.join(folder, name)}.json")
