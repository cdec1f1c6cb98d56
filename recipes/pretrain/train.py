#!/usr/bin/env python3
"""MGF pretraining recipe.

    python recipes/pretrain/train.py hparams/mgf.yaml [--overrides]

Pretrains one Transformer encoder with one objective per time scale (frame,
phoneme, utterance; see hparams/mgf.yaml). Re-running the same command resumes
from the last checkpoint. After every epoch the encoder is exported to
``<output_folder>/pretrained`` (the folder downstream recipes load).
"""

import logging
import math
import os
import sys

import speechbrain as sb
import torch
from speechbrain.utils.distributed import if_main_process, run_on_main

from mgf_sb.batch import MGFCollate
from mgf_sb.checkpoint import save_pretrained
from mgf_sb.data.audio import read_crop
from mgf_sb.data.batching import dynamic_batch_sampler
from mgf_sb.data.prepare_audio import prepare_pretraining
from mgf_sb.data.shards import shard_loaders
from mgf_sb.distributed import CPUFriendlyDDP, ddp_sum, seed_data_stream
from mgf_sb.live_curves import attach_tensorboard
from mgf_sb.pretraining import mgf_forward
from mgf_sb.recipe import start_experiment

logger = logging.getLogger(__name__)


class MGFBrain(CPUFriendlyDDP, sb.Brain):
    """Sums the enabled scales' losses; logs each scale's loss per epoch
    (and to TensorBoard with ``use_tensorboard: True``, see mgf_sb.live_curves)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        attach_tensorboard(self)

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
            if name.endswith(("_acc", "_interp_l1")):  # accuracies; frame_interp_l1 (copying neighbours)
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


def uses_shards(hparams):
    """True for ``data_format: shards`` (WebDataset shards), False for ``manifest``."""
    if hparams["data_format"] not in ("manifest", "shards"):
        raise ValueError(f"data_format must be 'manifest' or 'shards', got {hparams['data_format']!r}")
    return hparams["data_format"] == "shards"


def shards_dataio(hparams):
    """Loaders streaming WebDataset shards (``--data_format=shards --shards=<folder or pattern>``).

    The training loader is registered with the Checkpointer, so an intra-epoch
    checkpoint stores the shard position of every process and worker.
    """
    if not hparams["shards"]:
        raise ValueError("--data_format=shards needs --shards=<shards folder or shard-{000000..000123}.tar pattern>; "
                         "make them with recipes/pretrain/make_shards.py")
    train, valid = shard_loaders(
        hparams["shards"],
        train_collate=MGFCollate(**hparams["collate_args"]),
        valid_collate=MGFCollate(**hparams["collate_args"], random_crop=False),
        crop_seconds=hparams["crop_seconds"],
        max_batch_length=hparams["max_batch_length"] if hparams["dynamic_batching"] else None,
        batch_size=hparams["batch_size"],
        shards_index=hparams["shards_index"],
        valid_shards=hparams["valid_shards"],
        shuffle_buffer=hparams["shuffle_buffer"],
        bucket_buffer=hparams["bucket_buffer"],
        max_padding_ratio=hparams["max_padding_ratio"],
        num_workers=hparams["num_workers"],
        seed=hparams["seed"],
        sample_rate=hparams["sample_rate"],
    )
    hparams["checkpointer"].add_recoverable("shard_loader", train)
    return {"train": train, "valid": valid}, {}, {}


def batches_per_epoch(train_set, train_opts, world_size=1):
    """Training batches one process runs per epoch, as SpeechBrain will make them.

    Dynamic batching: the batch sampler's length; fixed batches: ``batch_size``
    utterances. Under DDP, SpeechBrain shards the sampler (or the utterances)
    across ``world_size`` processes, padding the last shard. Shards
    (``data_format: shards``): the loader's own per-process estimate.
    """
    sampler = train_opts.get("batch_sampler")
    if sampler is not None:
        return math.ceil(len(sampler) / world_size)
    if "batch_size" in train_opts:
        return math.ceil(math.ceil(len(train_set) / world_size) / train_opts["batch_size"])
    return len(train_set)  # a ShardLoader: already per process


def resolve_schedule(hparams, batches, grad_accumulation_factor=1):
    """Optimiser-step counts of the lr schedule and the EMA annealing, from the data.

    ``total = (batches // grad_accumulation_factor) * number_of_epochs`` (SpeechBrain
    steps the optimiser every ``grad_accumulation_factor`` batches of an epoch), unless
    ``lr_total_steps`` is given; warm-up and EMA annealing are fractions of it
    (``lr_warmup_fraction``, ``ema_anneal_fraction``) unless ``lr_warmup_steps`` /
    ``ema_steps`` are given.

    Returns
    -------
    dict
        total_steps, warmup_steps, ema_steps, steps_per_epoch and, for each, whether it
        was computed (``*_source``: "computed" | "given").
    """
    accum = max(1, int(grad_accumulation_factor))
    steps_per_epoch = max(1, int(batches) // accum)
    computed = steps_per_epoch * int(hparams["number_of_epochs"])
    out = {"batches_per_epoch": int(batches), "steps_per_epoch": steps_per_epoch, "grad_accumulation_factor": accum}

    def pick(key, value):
        given = hparams.get(key)
        out[key + "_source"] = "computed" if given is None else "given"
        return int(value) if given is None else int(given)

    out["total_steps"] = pick("lr_total_steps", computed)
    out["warmup_steps"] = pick("lr_warmup_steps", round(hparams["lr_warmup_fraction"] * out["total_steps"]))
    out["ema_steps"] = pick("ema_steps", max(1, round(hparams["ema_anneal_fraction"] * out["total_steps"])))
    if not 0 <= out["warmup_steps"] < out["total_steps"]:
        raise ValueError(
            f"lr warm-up of {out['warmup_steps']} steps does not fit in {out['total_steps']} total steps "
            f"({batches} batches per epoch per process x {hparams['number_of_epochs']} epochs / "
            f"grad_accumulation_factor {accum}): lower --lr_warmup_fraction / --lr_warmup_steps or train longer")
    return out


def describe_schedule(s, epochs, world_size):
    """One line for the log: the resolved step counts and where they come from."""
    return (f"schedule: {s['batches_per_epoch']} batches per epoch per process ({world_size} process"
            f"{'es' if world_size > 1 else ''}) / grad_accumulation_factor {s['grad_accumulation_factor']} "
            f"x {epochs} epochs -> lr_total_steps={s['total_steps']} ({s['lr_total_steps_source']}), "
            f"lr_warmup_steps={s['warmup_steps']} ({s['lr_warmup_steps_source']}), "
            f"ema_steps={s['ema_steps']} ({s['ema_steps_source']})")


def main(argv):
    hparams, run_opts = start_experiment(argv)  # args, DDP group, YAML, threads, output folder
    shards = uses_shards(hparams)
    if not hparams["skip_prep"] and not shards:
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
    datasets, train_opts, valid_opts = shards_dataio(hparams) if shards else dataio_prepare(hparams)

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
    # Schedules follow the data: step counts from the batches each process runs.
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    schedule = resolve_schedule(hparams, batches_per_epoch(datasets["train"], train_opts, world_size),
                                brain.grad_accumulation_factor)
    lr_scheduler = hparams["lr_scheduler"](n_warmup_steps=schedule["warmup_steps"], total_steps=schedule["total_steps"])
    hparams["lr_scheduler"] = brain.hparams.lr_scheduler = lr_scheduler
    hparams["checkpointer"].add_recoverable("lr_scheduler", lr_scheduler)  # a resumed run restores its own
    hparams["target"].ema_steps = schedule["ema_steps"]
    logger.info(describe_schedule(schedule, hparams["number_of_epochs"], world_size))  # on the console too
    # Same initial weights on every process (seeded at YAML load); from here on each
    # process (and data-loader worker) draws its own crops, views and masks.
    seed_data_stream(hparams["seed"])
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
