#!/usr/bin/env python3
"""MGF pretraining recipe.

    python recipes/pretrain/train.py hparams/mgf.yaml [--overrides]

Pretrains one Transformer encoder with one objective per time scale (frame,
phoneme, utterance; see hparams/mgf.yaml). Re-running the same command resumes
from the last checkpoint. After every epoch the encoder is exported to
``<output_folder>/pretrained`` (the folder downstream recipes load).
"""

import logging
import os
import sys

import speechbrain as sb
from speechbrain.utils.distributed import if_main_process, run_on_main

from mgf_sb.batch import MGFCollate
from mgf_sb.checkpoint import save_pretrained
from mgf_sb.data.audio import read_crop
from mgf_sb.data.batching import dynamic_batch_sampler
from mgf_sb.data.prepare_audio import prepare_pretraining
from mgf_sb.distributed import CPUFriendlyDDP, ddp_sum
from mgf_sb.pretraining import mgf_forward
from mgf_sb.recipe import start_experiment

logger = logging.getLogger(__name__)


class MGFBrain(CPUFriendlyDDP, sb.Brain):
    """Sums the enabled scales' losses; logs each scale's loss per epoch."""

    def compute_forward(self, batch, stage):
        """Features -> masked online encoding (+ teacher encoding when needed)."""
        batch = batch.to(self.device)
        epoch = self.hparams.epoch_counter.current if stage == sb.Stage.TRAIN else None
        return mgf_forward(self.modules.features, self.modules.encoder, self.hparams.target, batch,
                           needs_teacher=self.hparams.objectives.needs_teacher, epoch=epoch)

    def compute_objectives(self, predictions, batch, stage):
        """Weighted sum over the enabled scales (see mgf_sb.objectives.ScaleSet)."""
        total, losses, stats = self.modules.objectives(predictions)
        self.scale_sums["loss"] = self.scale_sums.get("loss", 0.0) + float(total.detach())
        for name, loss in losses.items():
            self.scale_sums[name] = self.scale_sums.get(name, 0.0) + float(loss.detach())
        for name, value in stats.items():
            if name.endswith("_acc"):
                self.scale_sums[name] = self.scale_sums.get(name, 0.0) + value
        self.scale_batches += 1
        return total

    def on_fit_batch_start(self, batch, should_step):
        """Warmup + decay LR, set right before each optimiser step."""
        if should_step:
            self.hparams.lr_scheduler(self.optimizer)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """EMA teacher update after each optimiser step."""
        if should_step:
            self.hparams.target.update(self.hparams.encoder)

    def _reduced_scale_stats(self):
        """Per-scale means over every batch of every process (DDP-safe)."""
        names = sorted(self.scale_sums)
        *sums, batches = ddp_sum([self.scale_sums[k] for k in names] + [self.scale_batches])
        means = {k: v / max(batches, 1.0) for k, v in zip(names, sums)}
        return {"loss": means.pop("loss", float("nan")), **means}

    def on_stage_start(self, stage, epoch=None):
        self.scale_sums, self.scale_batches = {}, 0

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Logs each scale's mean loss; checkpoints and exports after validation."""
        stats = self._reduced_scale_stats()  # includes "loss", averaged over all processes
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        if stage == sb.Stage.VALID:
            lr = self.optimizer.param_groups[0]["lr"]
            self.hparams.train_logger.log_stats(
                stats_meta={"epoch": epoch, "lr": lr, "step": int(self.hparams.target.step)},
                train_stats=self.train_stats,
                valid_stats=stats,
            )
            self.checkpointer.save_and_keep_only(meta={"loss": stats["loss"]}, min_keys=["loss"], num_to_keep=2)
            if if_main_process():
                save_pretrained(
                    self.hparams.pretrained_folder,
                    self.hparams.features,
                    self.hparams.encoder,
                    meta={"epoch": epoch, "step": int(self.hparams.target.step), "valid": stats},
                )


def dataio_prepare(hparams):
    """Train/valid datasets, dynamic batch sampler and the masking collate."""
    datasets = {}
    for split in ("train", "valid"):
        ds = sb.dataio.dataset.DynamicItemDataset.from_csv(os.path.join(hparams["manifest_folder"], f"{split}.csv"))
        datasets[split] = ds

    crop = hparams["crop_seconds"]
    sr = hparams["sample_rate"]

    # Long files (an hour-long recording) are never decoded whole: read only
    # a random crop_seconds window (validation: the first one).
    def make_audio_pipeline(random_crop):
        @sb.utils.data_pipeline.takes("wav", "duration")
        @sb.utils.data_pipeline.provides("sig")
        def audio_pipeline(wav, duration):
            return read_crop(wav, duration, crop, sr, random_start=random_crop)

        return audio_pipeline

    sb.dataio.dataset.add_dynamic_item([datasets["train"]], make_audio_pipeline(random_crop=True))
    sb.dataio.dataset.add_dynamic_item([datasets["valid"]], make_audio_pipeline(random_crop=False))
    sb.dataio.dataset.set_output_keys(list(datasets.values()), ["id", "sig"])

    collate = MGFCollate(**hparams["collate_args"])
    if hparams["dynamic_batching"]:
        sampler = dynamic_batch_sampler(
            datasets["train"],
            max_batch_length=hparams["max_batch_length"],
            num_buckets=hparams["num_buckets"],
            length_func=lambda x: min(float(x["duration"]), crop),
            seed=hparams["seed"],
        )
        train_opts = {"batch_sampler": sampler, "num_workers": hparams["num_workers"], "collate_fn": collate}
    else:  # fixed number of utterances per batch (per process under DDP)
        train_opts = {"batch_size": hparams["batch_size"], "shuffle": True, "num_workers": hparams["num_workers"],
                      "collate_fn": collate}
    valid_opts = {
        "batch_size": 8,
        "num_workers": hparams["num_workers"],
        "collate_fn": MGFCollate(**hparams["collate_args"], random_crop=False),
    }
    return datasets, train_opts, valid_opts


def main(argv):
    hparams, run_opts = start_experiment(argv)  # args, DDP group, YAML, threads, output folder
    if not hparams["skip_prep"]:
        run_on_main(
            prepare_pretraining,
            kwargs=dict(
                data_folder=hparams["data_folder"],
                save_folder=hparams["manifest_folder"],
                train_splits=hparams["train_splits"],
                valid_splits=hparams["valid_splits"],
                valid_fraction=hparams["valid_fraction"],
                min_duration=hparams["min_duration"],
                max_duration=hparams["max_duration"],
                sample_rate=hparams["sample_rate"],
                num_workers=hparams["prep_workers"],
                seed=hparams["seed"],
            ),
        )
    datasets, train_opts, valid_opts = dataio_prepare(hparams)

    # The EMA teacher starts as a copy of the encoder; it must exist before
    # the checkpointer restores it.
    hparams["target"].attach(hparams["encoder"])
    n_params = sum(p.numel() for p in hparams["encoder"].parameters())
    logger.info(f"MGF encoder: {n_params / 1e6:.2f} M parameters; scales: {hparams['objectives'].weights}")

    brain = MGFBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    brain.fit(
        brain.hparams.epoch_counter,
        datasets["train"],
        datasets["valid"],
        train_loader_kwargs=train_opts,
        valid_loader_kwargs=valid_opts,
    )
    logger.info(f"pretrained encoder: {hparams['pretrained_folder']}")


if __name__ == "__main__":
    main(sys.argv[1:])
