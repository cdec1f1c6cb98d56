#!/usr/bin/env python3
"""TIMIT frame-wise phoneme classification: frozen upstream + a frame head.

    python recipes/TIMIT/train.py hparams/timit.yaml [--upstream=fbank|random|<pretrained folder>|hf:<folder>]
        [--head=linear|bilstm]

The upstream's layers are combined by a learned weighted sum (or one layer,
``--layer``) and the head classifies every encoder frame into the 39 folded
TIMIT phones (see timit_prepare.py for the protocol): ``linear`` (a linear
probe, the default) or ``bilstm`` (a small 2-layer BiLSTM + linear). The lr is
annealed on the dev frame error with a floor, and training stops early when
the dev accuracy stops improving (hparams/timit.yaml). The checkpoint
with the best dev frame accuracy is evaluated on dev and on the 24-speaker
core test set; results go to ``<output_folder>/results.{json,md}`` and the
per-phone accuracies to ``<output_folder>/per_phone_{dev,test}.txt``.
Re-running the same command resumes from the last checkpoint.

Several GPUs (or CPU processes with ``--distributed_backend=gloo``)::

    torchrun --nproc_per_node=4 recipes/TIMIT/train.py hparams/timit.yaml

shards the training set over the processes (``batch_size`` is per process);
dev/test are not sharded, so every process scores the whole set and rank 0
writes the results. ``--precision=bf16`` trains under autocast.

Training labels follow the upstream's frames: each frame gets the label of the
phone segment containing its centre, as the upstream's front end places it
(``frame_centres``: the middle of the stacked 10 ms fbank frames for MGF and
fbank, the middle of the conv receptive field for an ``hf:`` wav2vec 2.0 /
HuBERT / WavLM). Dev and test are always scored at the standard 100 frames/s,
each 10 ms frame taking the prediction of the nearest upstream frame, so
accuracies are comparable across frame rates. Frames of deleted ``q``
segments are ignored.
"""

import logging
import os
import sys

import numpy as np
import speechbrain as sb
import torch
from speechbrain.utils.distributed import if_main_process, run_on_main

from mgf_sb.distributed import ddp_sum
from mgf_sb.downstream import DownstreamBrain, announce_data, write_results
from mgf_sb.finished import finished_rerun, mark_finished
from mgf_sb.heads import valid_mask
from mgf_sb.upstream import describe_source, upstream_tag
from mgf_sb.recipe import start_experiment
from timit_prepare import PHONES_39, decode_segments, frame_labels, labels_at, nearest_frames, prepare_timit

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PHONE_INDEX = {p: i for i, p in enumerate(PHONES_39)}


class TIMITBrain(DownstreamBrain):
    """Frame-wise cross-entropy; frame accuracy from a 39x39 confusion matrix."""

    def compute_forward(self, batch, stage):
        """Waveforms -> (B, T, 39) logits and (B,) valid frames."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        feats, n_frames = self.encode(wavs, wav_lens, stage)
        return self.modules.probe(feats, n_frames), n_frames

    def compute_objectives(self, predictions, batch, stage):
        """Cross-entropy over the labelled valid frames; updates the confusion matrix.

        Training uses labels at the upstream's own frames; dev and test are scored at 100 fps
        (TIMIT's 10 ms frames), each taking the prediction of the nearest upstream frame, so
        upstreams at any frame rate (100 Hz fbank, 50 Hz MGF, 50 Hz wav2vec 2.0) are scored on
        the same frames.
        """
        logits, n_frames = predictions
        if stage != sb.Stage.TRAIN:
            labels, n_100 = batch.labels_100
            index, _ = batch.index_100
            n_100 = torch.round(n_100 * labels.shape[1]).long()
            logits = torch.gather(logits, 1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
            mask = valid_mask(n_100, labels.shape[1], logits.device) & (labels >= 0)
            self._count(labels[mask], logits[mask])
            if not mask.any():  # no labelled frame in this batch: nothing to score
                return torch.zeros((), device=logits.device)
            # the loss at the scored (100 fps) frames, as logged for dev and test
            return torch.nn.functional.cross_entropy(logits[mask], labels[mask])
        labels, _ = batch.labels
        if labels.shape[1] != logits.shape[1]:
            raise RuntimeError(
                f"{labels.shape[1]} frame labels for {logits.shape[1]} upstream frames "
                f"(batch {batch.id}): the label frame rate does not match the upstream's"
            )
        mask = valid_mask(n_frames, logits.shape[1], logits.device) & (labels >= 0)
        targets = labels[mask]
        logits = logits[mask]
        loss = torch.nn.functional.cross_entropy(logits, targets)
        self._count(targets, logits)
        return loss

    def _count(self, targets, logits):
        """Adds (N,) targets vs (N, C) logits to the confusion matrix."""
        n = self.hparams.n_classes
        pairs = targets * n + logits.argmax(-1)
        self.confusion += torch.bincount(pairs.cpu(), minlength=n * n).view(n, n)

    def on_stage_start(self, stage, epoch=None):
        self.confusion = torch.zeros(self.hparams.n_classes, self.hparams.n_classes, dtype=torch.long)

    def frame_stats(self):
        """Accuracy and the majority-class frequency (chance) of the current stage."""
        total = int(self.confusion.sum())
        counts = self.confusion.sum(1)
        return {
            "acc": float(self.confusion.diag().sum()) / max(total, 1),
            "frames": total,
            "majority_class": PHONES_39[int(counts.argmax())],
            "majority_frequency": float(counts.max()) / max(total, 1),
        }

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            # Under DDP each process saw its shard of the training set: sum
            # the confusion matrices, average the losses (equal batch counts).
            n = self.hparams.n_classes
            *counts, loss_sum, world = ddp_sum(self.confusion.flatten().tolist() + [stage_loss, 1.0])
            self.confusion = torch.tensor(counts, dtype=torch.long).view(n, n)
            stage_loss = loss_sum / world
        stats = {"loss": stage_loss, "acc": self.frame_stats()["acc"]}
        if stage == sb.Stage.TRAIN:
            self.train_stats = dict(stats, frames=int(self.confusion.sum()))  # all processes' frames
        elif stage == sb.Stage.VALID:
            meta = {"epoch": epoch, "lr": self.anneal_and_stop(1.0 - stats["acc"])}  # lr floor, early stopping
            weights = self.layer_weights()
            if weights is not None:
                meta["layer_weights"] = " ".join(f"{w:.3f}" for w in weights)
            self.hparams.train_logger.log_stats(stats_meta=meta, train_stats=self.train_stats, valid_stats=stats)
            self.checkpointer.save_and_keep_only(meta={"acc": stats["acc"]}, max_keys=["acc"], num_to_keep=1)
        else:
            name = self.eval_name
            self.hparams.train_logger.log_stats(  # "dev loss", "dev acc": the set scored, not "test"
                stats_meta={"evaluated": name, "epoch loaded": self.hparams.epoch_counter.current,
                            **{f"{name} {k}": v for k, v in stats.items()}}
            )
            result = self.frame_stats()
            result["loss"] = stage_loss
            self.eval_results[name] = result
            if if_main_process():  # every process scored the whole set (not sharded)
                self.write_per_phone(os.path.join(self.hparams.output_folder, f"per_phone_{name}.txt"))

    def write_per_phone(self, path):
        """One line per phone: frames, accuracy, most frequent confusion."""
        c = self.confusion
        with open(path, "w") as f:
            f.write("phone\tframes\taccuracy\tmost_confused_with\n")
            for i, p in enumerate(PHONES_39):
                row = c[i].clone()
                n = int(row.sum())
                acc = float(row[i]) / n if n else float("nan")
                row[i] = -1
                confused = PHONES_39[int(row.argmax())] if n and int(row.max()) > 0 else "-"
                f.write(f"{p}\t{n}\t{acc:.4f}\t{confused}\n")
        logger.info(f"per-phone accuracy written to {path}")


def dataio_prepare(hparams):
    """train/dev/test datasets: audio, one label per upstream frame (training), and the
    100 fps labels with, for each, the upstream frame whose prediction scores it."""
    front = hparams["upstream_model"].features  # FeatureExtractor or a Hugging Face model's front end
    hop_100 = hparams["hop_length"]

    @sb.utils.data_pipeline.takes("wav", "segments")
    @sb.utils.data_pipeline.provides("sig", "labels", "labels_100", "index_100")
    def pipeline(wav, segments):
        sig = sb.dataio.dataio.read_audio(wav)
        yield sig
        segs = decode_segments(segments)
        centres = front.frame_centres(len(sig))
        yield torch.LongTensor([PHONE_INDEX.get(p, IGNORE_INDEX) for p in labels_at(segs, centres, len(sig))])
        labels = frame_labels(segs, len(sig), hop_100, 1)
        yield torch.LongTensor([PHONE_INDEX.get(p, IGNORE_INDEX) for p in labels])
        yield torch.from_numpy(nearest_frames(centres, np.arange(len(labels)) * hop_100))

    datasets = {}
    for split in ("train", "dev", "test"):
        ds = sb.dataio.dataset.DynamicItemDataset.from_csv(os.path.join(hparams["manifest_folder"], f"{split}.csv"))
        if split != "train":
            ds = ds.filtered_sorted(sort_key="duration")
        datasets[split] = ds
    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), pipeline)
    sb.dataio.dataset.set_output_keys(list(datasets.values()), ["id", "sig", "labels", "labels_100", "index_100"])
    return datasets


def main(argv):
    hparams, run_opts = start_experiment(argv)  # args, DDP group, YAML, threads, output folder
    if finished_rerun(hparams):  # the same command again: nothing to do, and it says so
        return None
    announce_data(hparams["data_folder"])
    if not hparams["skip_prep"]:
        run_on_main(
            prepare_timit,
            kwargs=dict(
                data_folder=hparams["data_folder"],
                save_folder=hparams["manifest_folder"],
                exclude_sa=hparams["exclude_sa"],
                sample_rate=hparams["sample_rate"],
                hop_length=hparams["hop_length"],
            ),
        )
    datasets = dataio_prepare(hparams)

    upstream = hparams["upstream_model"]
    if not hparams["freeze"] and upstream.encoder is not None:
        hparams["checkpointer"].add_recoverable("upstream_encoder", upstream.encoder)
    logger.info(
        f"upstream {upstream_tag(hparams['upstream'])} ({hparams['upstream']}): {upstream.num_layers} representations of size "
        f"{upstream.output_size} at {upstream.frame_rate:g} Hz; layer={hparams['layer']}; freeze={hparams['freeze']}"
    )

    brain = TIMITBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    loader = {"batch_size": hparams["batch_size"], "num_workers": hparams["num_workers"]}
    brain.fit(
        brain.hparams.epoch_counter,
        datasets["train"],
        datasets["dev"],
        train_loader_kwargs=dict(loader, shuffle=True),
        valid_loader_kwargs=loader,
    )

    brain.eval_results = {}
    for name in ("dev", "test"):
        brain.eval_name = name
        brain.evaluate(datasets[name], max_key=hparams["test_max_key"], test_loader_kwargs=loader)
    results = {
        "head": hparams["head"],
        "upstream": describe_source(hparams["upstream"]),
        "upstream_source": str(hparams["upstream"]),
        "layer": hparams["layer"],
        "layer_weights": brain.layer_weights(),
        "frame_rate": upstream.frame_rate,
        "data_folder": hparams["data_folder"],
        **brain.eval_results,
    }
    lines = [
        f"# TIMIT frame accuracy (39 phones), upstream {upstream_tag(hparams['upstream'])}, head {results['head']}\n",
        "| set | frame accuracy | frames | chance (majority class) |",
        "|---|---|---|---|",
    ]
    for name in ("dev", "test"):
        r = brain.eval_results[name]
        lines.append(
            f"| {name} | {100 * r['acc']:.2f} % | {r['frames']} | "
            f"{100 * r['majority_frequency']:.2f} % ({r['majority_class']}) |"
        )
    if if_main_process():
        write_results(hparams["output_folder"], "results", results, "\n".join(lines) + "\n")
        mark_finished(hparams, brain.fit_state, [os.path.join(hparams["output_folder"], "results.md")])
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
