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
from mgf_sb.finished import finished_rerun, mark_finished
from mgf_sb.train_log import pretraining_summary
from mgf_sb.pretrained_folder import save_pretrained
from mgf_sb.data.audio import read_crop
from mgf_sb.data.batching import dynamic_batch_sampler
from mgf_sb.data.prepare_audio import prepare_pretraining
from mgf_sb.data.shards import shard_loaders
from mgf_sb.distributed import CPUFriendlyDDP, ddp_sum, seed_data_stream, unwrap
from mgf_sb.distributed import world_size as ddp_world_size
from mgf_sb.live_curves import attach_tensorboard
from mgf_sb.pretraining import (LOGGED_STATS, EpochStats, mgf_forward, mixed_valid_order, scale_grad_norms,
                                view_channel_fn)
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
        # the context-only baseline: every validation batch, the diagnostic training batches
        context = stage != sb.Stage.TRAIN or self.diagnostics_due()
        # view_channel: each view its own random channel, in training only (validation compares epochs)
        channel = None
        if stage == sb.Stage.TRAIN and getattr(self.hparams, "view_channel", False):
            hp = self.hparams
            channel = view_channel_fn(n_knots=hp.view_channel_knots, eq_db=hp.view_channel_eq_db,
                                      gain_db=hp.view_channel_gain_db, noise_floor_db=hp.view_channel_noise_floor_db)
        return mgf_forward(self.modules.features, self.modules.encoder, self.hparams.target, batch,
                           needs_teacher=self.hparams.objectives.needs_teacher, epoch=epoch,
                           context_baseline=context, alteration=self.hparams.objectives.input_alteration,
                           channel=channel)

    def diagnostics_due(self):
        """Training batches that also measure the diagnostics: every ``diagnostics_every``
        optimiser steps and the first batch of each epoch (so every epoch logs them)."""
        every = int(self.hparams.diagnostics_every or 0)
        if every <= 0:
            return False
        return self.stats.counts.get("loss", 0) == 0 or int(self.hparams.target.step) % every == 0

    def compute_objectives(self, predictions, batch, stage):
        """Weighted sum over the enabled scales (see mgf_sb.objectives.ScaleSet)."""
        balancer = self.hparams.scale_balancer
        factors = balancer.factors()
        total, losses, stats = self.modules.objectives(predictions, factors=factors)
        if stage == sb.Stage.TRAIN and self.diagnostics_due():
            # each scale's gradient on the shared encoder, before the backward of the sum
            raw = scale_grad_norms(losses, list(unwrap(self.modules.encoder).parameters()))
            raw = dict(zip(raw, (v / ddp_world_size() for v in ddp_sum(list(raw.values())))))  # same on every process
            balancer.observe(raw)
            weights = self.hparams.objectives.weights
            for name, g in raw.items():
                stats[f"{name}_grad_norm"] = weights[name] * factors.get(name, 1.0) * g
        self.stats.add("loss", float(total.detach()))
        for name, loss in losses.items():
            self.stats.add(name, float(loss.detach()))
        for name, value in stats.items():
            # accuracies (+ phoneme_context_acc); frame_interp_l1 (copying neighbours); the peers'
            # codebook usage (*_code_ppl); the diagnostics (README "Objectives")
            if name.endswith(LOGGED_STATS):
                self.stats.add(name, value)
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
        means = self.stats.reduced()
        return {"loss": means.pop("loss", float("nan")), **means}

    def run_state_stats(self):
        """End-of-epoch state: the teacher's distance from its initial weights, the
        normaliser's updates, the balancing factors (README "Objectives")."""
        out = self.hparams.target.init_stats(unwrap(self.modules.encoder))
        out["norm_updates"] = float(self.hparams.features.updates)
        if self.hparams.scale_balancer.mode != "none":
            out.update({f"{k}_balance": v for k, v in self.hparams.scale_balancer.factors().items()})
        return out

    def on_stage_start(self, stage, epoch=None):
        self.stats = EpochStats()

    def follow_real_steps(self, epoch):
        """After each epoch: the lr and EMA step counts from the optimiser steps really made.

        The counts were resolved at start from an estimate of the batches per epoch;
        on shards the index's estimate can be off (dynamic batching packs short
        samples), and the lr decay would end early or never. The mean steps of the
        epochs run so far replace the estimate for the epochs left (a no-op when it
        was exact, as on a manifest).
        """
        done = int(self.hparams.target.step)
        per_epoch = round(done / max(1, epoch))
        if per_epoch < 1 or epoch >= self.hparams.number_of_epochs:
            return
        new = resolve_schedule(self.hparams.__dict__, per_epoch * self.grad_accumulation_factor,
                               self.grad_accumulation_factor)
        new["total_steps"] = done + new["total_steps"] - per_epoch * epoch  # steps made + the epochs left
        if new["lr_total_steps_source"] == "given" or new["total_steps"] == self.schedule["total_steps"]:
            return
        warmup = new["warmup_steps"] if self.hparams.lr_scheduler.current_step < new["warmup_steps"] \
            else self.hparams.lr_scheduler.n_warmup_steps  # a finished warm-up stays finished
        warmup = min(warmup, new["total_steps"] - 1)
        self.hparams.lr_scheduler.retarget(warmup, new["total_steps"])
        if new["ema_steps_source"] == "computed":
            self.hparams.target.ema_steps = new["ema_steps"]
        self.hparams.target.total_steps = new["total_steps"]  # ema_schedule: half_life
        logger.info(f"schedule: epoch {epoch} ran {per_epoch} optimiser steps per epoch (estimated "
                    f"{self.schedule['steps_per_epoch']}): lr_total_steps {self.schedule['total_steps']} -> "
                    f"{new['total_steps']}, lr_warmup_steps={warmup}, ema_steps={self.hparams.target.ema_steps}")
        self.schedule = dict(new, warmup_steps=warmup, steps_per_epoch=per_epoch)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Logs each scale's mean loss; checkpoints and exports after validation."""
        stats = self._reduced_scale_stats()  # includes "loss", averaged over all processes
        if stage == sb.Stage.TRAIN:
            self.train_stats = {**stats, **self.run_state_stats()}
            self.follow_real_steps(epoch)
            return
        if stage == sb.Stage.VALID:
            lr = self.optimizer.param_groups[0]["lr"]
            self.hparams.train_logger.log_stats(  # every key, in train_log.txt only
                stats_meta={"epoch": epoch, "lr": lr, "step": int(self.hparams.target.step)},
                train_stats=self.train_stats,
                valid_stats=stats,
                verbose=False,
            )
            if if_main_process():  # the console (and log.txt): a short line
                logger.info(pretraining_summary(epoch, self.hparams.number_of_epochs, lr, self.train_stats, stats))
            self.checkpointer.save_and_keep_only(meta={"loss": stats["loss"]}, min_keys=["loss"],
                                                 num_to_keep=self.hparams.ckpt_num_to_keep)
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
    keys = ["id", "sig"] + add_speaker_numbers(datasets)
    sb.dataio.dataset.set_output_keys(list(datasets.values()), keys)

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
        "batch_size": hparams["valid_batch_size"],
        "num_workers": hparams["num_workers"],
        "collate_fn": MGFCollate(**hparams["collate_args"], random_crop=False),
    }
    if hparams["valid_shuffle_seed"] is not None:  # batches that mix speakers, the same every epoch
        valid_opts["sampler"] = mixed_valid_order(len(datasets["valid"]), hparams["valid_shuffle_seed"])
    return datasets, train_opts, valid_opts


def add_speaker_numbers(datasets, column="spk_id"):
    """Where the manifests have a speaker column: each item's ``speaker`` number (the collate's
    ``speaker_key``, logged as ``utterance_same_speaker_negatives``; no loss uses it).

    The numbers index the sorted speakers of every split together, so they are the same in
    every process and split. Returns the output keys to add (``[]`` without the column, e.g.
    the pretraining prep's manifests of a plain folder of audio: no speaker is known).
    """
    if not all(ds.data and column in next(iter(ds.data.values())) for ds in datasets.values()):
        return []
    speakers = sorted({row[column] for ds in datasets.values() for row in ds.data.values()})
    number = {spk: i for i, spk in enumerate(speakers)}

    @sb.utils.data_pipeline.takes(column)
    @sb.utils.data_pipeline.provides("speaker")
    def speaker_pipeline(spk):
        return number[spk]

    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), speaker_pipeline)
    return ["speaker"]


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
    if finished_rerun(hparams):  # the same command again: nothing to do, and it says so
        return
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
    logger.info(f"MGF encoder: {n_params / 1e6:.2f} M parameters (what pretrained/ keeps; SpeechBrain's model "
                f"statistics below also count the objectives' heads, trainable, and the EMA teacher, a frozen copy "
                f"of the encoder); scales: {hparams['objectives'].weights}")

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
    hparams["target"].total_steps = schedule["total_steps"]  # ema_schedule: half_life
    if hparams["scale_balancer"].mode != "none":  # its running gradient norms resume with the run
        hparams["checkpointer"].add_recoverable("scale_balancer", hparams["scale_balancer"])
    brain.schedule = schedule  # re-derived after each epoch from the real step count (follow_real_steps)
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
    counter = hparams["epoch_counter"]
    if if_main_process() and counter.current >= counter.limit:
        mark_finished(hparams, counter, [hparams["pretrained_folder"]])


if __name__ == "__main__":
    main(sys.argv[1:])
