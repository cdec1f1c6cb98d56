#!/usr/bin/env python3
"""IEMOCAP emotion recognition on top of an upstream (fbank | random | MGF | hf:<local folder>).

    python recipes/IEMOCAP/train.py hparams/emotion.yaml [--test_session=1] [--upstream=...]

One leave-one-session-out fold: trains upstream -> layer selector -> head on
four sessions (one of them for validation, see iemocap_prepare.py), keeps the
checkpoint with the best validation UA and reports on the test session. Two
heads (``--head=``): ``linear`` (mean+std pooling, linear classifier; the
default) and ``attentive`` (attentive pooling, one hidden layer). The
cross-entropy is class-balanced, the lr is annealed on the dev UA with a floor
and training stops early when the dev UA stops improving (hparams/emotion.yaml).
Reported:

- WA: weighted accuracy (plain accuracy over utterances);
- UA: unweighted accuracy (mean per-class recall);
- the confusion matrix (rows: reference, columns: prediction).

They are logged and written to ``<output_folder>/test_results.{json,md}`` and
``confusion_matrix.tsv``, with the ``head`` name and a ``convex_reference``: the
UA of a full-batch logistic regression on the same pooled features (mean+std
of the layer mix the probe learned), fitted on the training sessions. Then the trained classifier is exported to
``<output_folder>/model`` (:func:`export_classifier_folder`) for inference.
Re-running the same command resumes. All five folds and their mean +- std:
``python recipes/IEMOCAP/run_folds.py hparams/emotion.yaml``.

Several GPUs (or CPU processes with ``--distributed_backend=gloo``)::

    torchrun --nproc_per_node=4 recipes/IEMOCAP/train.py hparams/emotion.yaml --test_session=1

shards the training set over the processes (``batch_size`` is per process);
validation and test are not sharded, so every process scores the whole set
and rank 0 writes the results and the export. ``--precision=bf16`` trains
under autocast.
"""

import json
import logging
import os
import sys

import numpy as np
import speechbrain as sb
import torch
from speechbrain.utils.distributed import if_main_process, run_on_main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iemocap_prepare import CLASSES, prepare_iemocap  # noqa: E402

from mgf_sb.pretrained_folder import (  # noqa: E402
    CONFIG_FILE, FEATURES_FILE, FORMAT, FORMAT_VERSION, save_pretrained,
)
from mgf_sb.data.manifest import read_manifest  # noqa: E402
from mgf_sb.distributed import ddp_sum  # noqa: E402
from mgf_sb.downstream import (  # noqa: E402
    DownstreamBrain,
    announce_data,
    balanced_class_weights,
    write_results,
)
from mgf_sb.finished import finished_rerun, mark_finished  # noqa: E402
from mgf_sb.upstream import describe_source, is_hf_source, upstream_tag  # noqa: E402
from mgf_sb.recipe import start_experiment

logger = logging.getLogger(__name__)


class EmotionBrain(DownstreamBrain):
    """Utterance classification: upstream -> layer selector -> pooling -> classifier."""

    # compute_forward: DownstreamBrain's (upstream -> layer selector -> head)

    def compute_objectives(self, logits, batch, stage):
        targets = batch.emo_encoded.data[:, 0]
        loss = torch.nn.functional.cross_entropy(logits, targets, weight=self.class_weights)
        if stage != sb.Stage.TRAIN:
            preds = logits.argmax(-1)
            for t, p in zip(targets.tolist(), preds.tolist()):
                self.confusion[t, p] += 1
            self.class_stats.append(batch.id, [CLASSES[p] for p in preds.tolist()],
                                    [CLASSES[t] for t in targets.tolist()])
        return loss

    def on_stage_start(self, stage, epoch=None):
        self.confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
        self.class_stats = sb.utils.metric_stats.ClassificationStats()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:  # DDP: mean over the processes' shards (equal batch counts)
            loss_sum, world = ddp_sum([stage_loss, 1.0])
            self.train_stats = {"loss": loss_sum / world}
            return
        metrics = emotion_metrics(self.confusion)
        stats = {"loss": stage_loss, "UA": metrics["UA"], "WA": metrics["WA"]}
        if stage == sb.Stage.VALID:
            old_lr = self.anneal_and_stop(1.0 - metrics["UA"])  # lr floor, early stopping
            meta = {"epoch": epoch, "lr": old_lr}
            weights = self.layer_weights()
            if weights is not None:
                meta["layer_weights"] = " ".join(f"{w:.3f}" for w in weights)
            self.hparams.train_logger.log_stats(stats_meta=meta, train_stats=self.train_stats, valid_stats=stats)
            self.checkpointer.save_and_keep_only(meta={"UA": metrics["UA"], "WA": metrics["WA"]},
                                                 max_keys=["UA"], num_to_keep=1)
        elif stage == sb.Stage.TEST:
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current}, test_stats=stats
            )
            self.test_metrics = dict(metrics, loss=stage_loss)


def emotion_metrics(confusion):
    """WA, UA and per-class recall from a confusion matrix (rows: reference).

    UA is the mean recall over the classes that occur in the reference (a
    class absent from the test set has no recall and is left out).

    Example
    -------
    >>> m = emotion_metrics(np.array([[8, 2], [1, 1]]))
    >>> round(m["WA"], 4), round(m["UA"], 4)
    (0.75, 0.65)
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    support = confusion.sum(1)
    total = support.sum()
    present = support > 0
    recall = np.divide(np.diag(confusion), support, out=np.zeros_like(support), where=present)
    return {
        "WA": float(np.trace(confusion) / total) if total else 0.0,
        "UA": float(recall[present].mean()) if present.any() else 0.0,
        "recall": {c: (float(r) if p else None) for c, r, p in zip(CLASSES, recall, present)},
        "support": {c: int(s) for c, s in zip(CLASSES, support)},
        "confusion": confusion.astype(np.int64).tolist(),
        "n_utterances": int(total),
    }


def confusion_table(confusion, classes=CLASSES):
    """Markdown table of a confusion matrix (rows: reference, columns: prediction)."""
    lines = ["| reference \\ predicted | " + " | ".join(classes) + " |",
             "|---|" + "---|" * len(classes)]
    for c, row in zip(classes, confusion):
        lines.append(f"| {c} | " + " | ".join(str(int(v)) for v in row) + " |")
    return "\n".join(lines)


def write_test_results(hparams, metrics, loss, class_stats, layer_weights, convex=None):
    """test_results.{json,md}, confusion_matrix.tsv and classification_stats.txt; logs them too.

    ``convex``: :meth:`~mgf_sb.downstream.DownstreamBrain.convex_reference`'s
    output, or None (``convex_reference: False``).
    """
    folder = hparams["output_folder"]
    results = {
        "task": "emotion",
        "head": hparams["head"],
        "upstream": str(hparams["upstream"]),
        "upstream_name": describe_source(hparams["upstream"]),
        "freeze": bool(hparams["freeze"]),
        "layer": hparams["layer"],
        "test_session": int(hparams["test_session"]),
        "data_folder": hparams["data_folder"],
        "classes": list(CLASSES),
        "loss": float(loss),
        "layer_weights": layer_weights,
        **metrics,
        "convex_reference": None,
    }
    rows = (f"| {results['head']} | {100 * metrics['UA']:.2f} | {100 * metrics['WA']:.2f} | "
            f"{metrics['n_utterances']} |\n")
    if convex is not None:
        ref = emotion_metrics(convex_confusion(convex["pred"], convex["target"]))
        results["convex_reference"] = ref["UA"]
        results["convex_reference_info"] = {"UA": ref["UA"], "WA": ref["WA"], "n_train": convex["n_train"],
                                            "l2": convex["l2"], "features": convex["features"]}
        rows += (f"| convex reference (logistic regression) | {100 * ref['UA']:.2f} | {100 * ref['WA']:.2f} | "
                 f"{ref['n_utterances']} |\n")
    table = confusion_table(metrics["confusion"])
    md = (f"# IEMOCAP emotion, test session {results['test_session']}\n\n"
          f"upstream: `{upstream_tag(hparams['upstream'])}` (freeze={results['freeze']}, layer={results['layer']}), "
          f"head: {results['head']}\n\n"
          f"| head | UA | WA | utterances |\n|---|---|---|---|\n{rows}\n"
          f"Confusion matrix:\n\n{table}\n")
    write_results(folder, "test_results", results, md)
    with open(os.path.join(folder, "confusion_matrix.tsv"), "w") as f:
        f.write("reference\\predicted\t" + "\t".join(CLASSES) + "\n")
        for c, row in zip(CLASSES, metrics["confusion"]):
            f.write(c + "\t" + "\t".join(str(v) for v in row) + "\n")
    with open(os.path.join(folder, "classification_stats.txt"), "w") as f:
        class_stats.write_stats(f)
    logger.info(f"IEMOCAP session {results['test_session']}: UA {100 * metrics['UA']:.2f} "
                f"WA {100 * metrics['WA']:.2f} ({metrics['n_utterances']} utterances)\n{table}")
    if convex is not None:
        logger.info(f"convex reference (logistic regression on the pooled features): "
                    f"UA {100 * results['convex_reference']:.2f}")
    return results


def convex_confusion(pred, target, n_classes=len(CLASSES)):
    """(N,), (N,) class indices -> (C, C) confusion matrix (rows: reference)."""
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (np.asarray(target), np.asarray(pred)), 1)
    return confusion


def export_classifier_folder(folder, upstream, layer_selector, head, upstream_source, layer, pooling,
                             hidden_size, classes=CLASSES, meta=None):
    """Writes the trained classifier for inference (mgf_sb.inference reads it)::

        <folder>/upstream/      pretrained-folder format (mgf_config.json, features.ckpt,
                                encoder.ckpt); for fbank only features.ckpt and a config
                                with "encoder": null
        <folder>/head.ckpt      {"layer_selector": state_dict, "classifier": state_dict}
        <folder>/head_config.json
        <folder>/labels.txt     one class name per line, in output-index order

    Arguments
    ---------
    folder : str
    upstream : mgf_sb.upstream.Upstream
    layer_selector : mgf_sb.upstream.LayerSelector
    head : mgf_sb.heads.UtteranceClassifier
    upstream_source : str
        What the recipe was given as ``upstream``.
    layer : int or None
    pooling : str
    hidden_size : int
    classes : sequence of str
    meta : dict, optional
        Stored in the upstream's ``mgf_config.json``.
    """
    up_folder = os.path.join(folder, "upstream")
    os.makedirs(up_folder, exist_ok=True)
    meta = dict(meta or {}, exported_by="recipes/IEMOCAP/train.py", upstream_source=str(upstream_source))
    if upstream.encoder is None:
        if upstream.features.normalizer.count == 0:
            raise ValueError("refusing to export a FeatureExtractor without normalisation statistics")
        torch.save(upstream.features.state_dict(), os.path.join(up_folder, FEATURES_FILE))
        stale = os.path.join(up_folder, "encoder.ckpt")
        if os.path.exists(stale):
            os.remove(stale)
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "features": upstream.features.config,
                  "encoder": None, "meta": meta}
        with open(os.path.join(up_folder, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
    else:
        save_pretrained(up_folder, upstream.features, upstream.encoder, meta=meta)
    torch.save({"layer_selector": layer_selector.state_dict(), "classifier": head.state_dict()},
               os.path.join(folder, "head.ckpt"))
    head_config = {
        "task": "emotion",
        "upstream_source": str(upstream_source),
        "layer": None if layer is None else int(layer),
        "num_layers": int(upstream.num_layers),
        "input_size": int(upstream.output_size),
        "pooling": pooling,
        "hidden_size": int(hidden_size),
        "n_classes": len(classes),
    }
    with open(os.path.join(folder, "head_config.json"), "w") as f:
        json.dump(head_config, f, indent=2)
    with open(os.path.join(folder, "labels.txt"), "w") as f:
        f.write("".join(c + "\n" for c in classes))
    logger.info(f"classifier exported to {folder}")
    return folder


def dataio_prepare(hparams):
    """Train/valid/test datasets (audio + class index) and loader options."""
    label_index = {c: i for i, c in enumerate(CLASSES)}

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    @sb.utils.data_pipeline.takes("emo")
    @sb.utils.data_pipeline.provides("emo_encoded")
    def label_pipeline(emo):
        return torch.tensor([label_index[emo]], dtype=torch.long)

    datasets = {}
    for split in ("train", "valid", "test"):
        ds = sb.dataio.dataset.DynamicItemDataset.from_csv(
            os.path.join(hparams["split_folder"], f"{split}.csv"),
            dynamic_items=[audio_pipeline, label_pipeline],
            output_keys=["id", "sig", "emo_encoded"],
        )
        datasets[split] = ds
    train_opts = {"batch_size": hparams["batch_size"], "num_workers": hparams["num_workers"]}
    sorting = hparams["sorting"]
    if sorting in ("ascending", "descending"):
        datasets["train"] = datasets["train"].filtered_sorted(sort_key="duration", reverse=sorting == "descending")
        train_opts["shuffle"] = False
    elif sorting == "random":
        train_opts["shuffle"] = True
    else:
        raise ValueError(f"sorting must be random, ascending or descending, got {sorting!r}")
    eval_opts = {"batch_size": hparams["batch_size"], "num_workers": hparams["num_workers"]}
    return datasets, train_opts, eval_opts


def class_weights(train_csv, balanced):
    """Inverse-frequency cross-entropy weights (mean 1 over the training utterances) or None."""
    labels = [CLASSES.index(row["emo"]) for row in read_manifest(train_csv)]
    return balanced_class_weights(labels, len(CLASSES), balanced)


def main(argv):
    hparams, run_opts = start_experiment(argv)  # args, DDP group, YAML, threads, output folder
    if finished_rerun(hparams):  # the same command again: nothing to do, and it says so
        return None
    announce_data(hparams["data_folder"])
    if not hparams["skip_prep"]:
        run_on_main(
            prepare_iemocap,
            kwargs=dict(
                data_folder=hparams["data_folder"],
                manifest_folder=hparams["manifest_folder"],
                split_folder=hparams["split_folder"],
                test_session=hparams["test_session"],
                valid_session=hparams["valid_session"],
                valid_fraction=hparams["valid_fraction"],
                improvised_only=hparams["improvised_only"],
                min_duration=hparams["min_duration"],
                max_duration=hparams["max_duration"],
                sample_rate=hparams["sample_rate"],
                num_workers=hparams["prep_workers"],
                seed=hparams["seed"],
            ),
        )
    datasets, train_opts, eval_opts = dataio_prepare(hparams)

    brain = EmotionBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    weights = class_weights(os.path.join(hparams["split_folder"], "train.csv"), hparams["class_balanced_loss"])
    brain.class_weights = None if weights is None else weights.to(brain.device)
    if weights is not None:
        logger.info("class-balanced cross-entropy, weights: "
                    + ", ".join(f"{c} {w:.3f}" for c, w in zip(CLASSES, weights.tolist())))
    brain.fit(
        brain.hparams.epoch_counter,
        datasets["train"],
        datasets["valid"],
        train_loader_kwargs=train_opts,
        valid_loader_kwargs=eval_opts,
    )
    brain.evaluate(datasets["test"], max_key="UA", test_loader_kwargs=eval_opts)
    if if_main_process():
        convex = None
        if hparams["convex_reference"]:  # same pooled features, full-batch logistic regression
            convex = brain.convex_reference(datasets["train"], datasets["test"], lambda b: b.emo_encoded.data[:, 0],
                                            len(CLASSES), l2=hparams["convex_l2"], batch_size=hparams["batch_size"])
        metrics = {k: v for k, v in brain.test_metrics.items() if k != "loss"}
        write_test_results(hparams, metrics, brain.test_metrics["loss"], brain.class_stats,
                           brain.layer_weights(), convex)
        head = hparams["head_model"]
        if is_hf_source(hparams["upstream"]):  # results are written; only the inference export is MGF/fbank-only
            logger.warning(f"no classifier export for an hf: upstream ({hparams['upstream']}): the inference "
                           f"folder format (mgf_sb.inference.MGFEmotionClassifier) holds MGF and fbank upstreams")
            mark_finished(hparams, brain.fit_state,
                          [os.path.join(hparams["output_folder"], "test_results.md")])
            return
        export_classifier_folder(
            hparams["model_folder"],
            hparams["upstream_model"],
            hparams["layer_selector"],
            head,
            upstream_source=hparams["upstream"],
            layer=hparams["layer"],
            pooling=head.pooling,
            hidden_size=head.hidden_size,
            meta={"test_session": int(hparams["test_session"]), "UA": brain.test_metrics["UA"],
                  "WA": brain.test_metrics["WA"]},
        )
        mark_finished(hparams, brain.fit_state, [os.path.join(hparams["output_folder"], "test_results.md")])


if __name__ == "__main__":
    main(sys.argv[1:])
