#!/usr/bin/env python3
"""VoxCeleb1 speaker identification (+ verification) on an upstream.

    python recipes/VoxCeleb/train.py hparams/voxceleb.yaml [--upstream=fbank|random|<folder>]

Trains a head (``--head=``) on the speakers of the identification split
(random crops), picks the checkpoint with the best dev accuracy, reports top-1
accuracy on the test split (whole utterances), then scores the verification
trials (``trial_file``) with the cosine similarity of the head's embeddings
and reports EER and minDCF (``verify.py`` does only that last part, from the
best checkpoint). Re-running the command resumes. Heads (mgf_sb.heads):

- ``linear`` (default): mean+std pooling -> standardisation -> linear
  classifier, class-weighted cross-entropy; verification on the standardised
  pooled statistics;
- ``xvector``: a small x-vector TDNN -> embedding -> cosine classifier with
  AAM-softmax; verification on the embedding, and the trial speakers are left
  out of training (``exclude_trial_speakers`` follows the head).

The lr is annealed on the dev error with a floor and training stops early
when the dev accuracy stops improving (hparams/voxceleb.yaml). After the test,
a convex reference (full-batch logistic regression on the mean+std pooled
features of the layer mix the probe learned, training split as whole
utterances) is scored on the same test split. Results:
``<output_folder>/results.json`` and ``.md``.

Several GPUs (or CPU processes with ``--distributed_backend=gloo``)::

    torchrun --nproc_per_node=4 recipes/VoxCeleb/train.py hparams/voxceleb.yaml

shards the training set over the processes (``batch_size`` is per process);
dev/test/trial audio is not sharded, so every process scores the whole set and
rank 0 writes the results. ``--precision=bf16`` trains under autocast.
"""

import csv
import logging
import os
import sys

import speechbrain as sb
import torch
from speechbrain.utils.distributed import if_main_process, run_on_main

from mgf_sb.data.audio import read_crop
from mgf_sb.distributed import ddp_sum, unwrap
from mgf_sb.downstream import DownstreamBrain, announce_data, balanced_class_weights, write_results
from mgf_sb.finished import finished_rerun, mark_finished
from mgf_sb.heads import count_parameters, select_head
from mgf_sb.metrics import compute_eer, compute_min_dcf, cosine_scores
from mgf_sb.upstream import BASELINES, describe_source, upstream_tag
from mgf_sb.recipe import start_experiment

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from voxceleb_prepare import prepare_voxceleb  # noqa: E402

logger = logging.getLogger(__name__)


class SpeakerBrain(DownstreamBrain):
    """Speaker identification on top of :class:`~mgf_sb.downstream.DownstreamBrain`."""

    # compute_forward: DownstreamBrain's (upstream -> layer selector -> head)

    def compute_objectives(self, predictions, batch, stage):
        targets = batch.spk_id_encoded.data.view(-1)
        logits = predictions
        if unwrap(self.modules.head).margin_loss:  # cosines -> AAM-softmax logits
            one_hot = torch.nn.functional.one_hot(targets, predictions.shape[-1]).to(predictions.dtype)
            logits = self.hparams.aam(predictions, one_hot)
        loss = torch.nn.functional.cross_entropy(logits, targets, weight=self.class_weights)
        predicted = predictions.argmax(-1)
        self.n_correct += int((predicted == targets).sum())
        self.n_seen += targets.numel()
        if stage != sb.Stage.TRAIN:
            decode = self.hparams.label_encoder.decode_ndim
            self.accuracy.append(batch.id, predictions=decode(predicted.tolist()), targets=decode(targets.tolist()))
        return loss

    def on_stage_start(self, stage, epoch=None):
        self.n_correct, self.n_seen = 0, 0
        if stage != sb.Stage.TRAIN:
            self.accuracy = self.hparams.accuracy_stats()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:  # DDP: each process trained on its shard; combine them
            self.n_correct, self.n_seen, loss_sum, world = ddp_sum([self.n_correct, self.n_seen, stage_loss, 1.0])
            stage_loss = loss_sum / world
        stats = {"loss": stage_loss, "acc": self.n_correct / max(self.n_seen, 1)}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        stats["acc"] = self.accuracy.summarize()["accuracy"]
        if stage == sb.Stage.VALID:
            meta = {"epoch": epoch, "lr": self.anneal_and_stop(1.0 - stats["acc"])}  # lr floor, early stopping
            weights = self.layer_weights()
            if weights is not None:
                meta["layer_weights"] = " ".join(f"{w:.2f}" for w in weights)
            self.hparams.train_logger.log_stats(stats_meta=meta, train_stats=self.train_stats, valid_stats=stats)
            self.checkpointer.save_and_keep_only(meta={"acc": stats["acc"]}, max_keys=["acc"], num_to_keep=1)
        if stage == sb.Stage.TEST:
            self.hparams.train_logger.log_stats(
                stats_meta={"Epoch loaded": self.hparams.epoch_counter.current}, test_stats=stats
            )
            self.test_stats = stats

    @torch.no_grad()
    def embed_dataset(self, dataset, batch_size):
        """{utterance ID: the head's verification embedding} of whole utterances (eval mode)."""
        loader = self.make_dataloader(dataset, stage=sb.Stage.TEST, batch_size=batch_size)
        self.modules.eval()
        out = {}
        for batch in loader:
            batch = batch.to(self.device)
            feats, n_frames = self.encode(*batch.sig, sb.Stage.TEST)
            emb = unwrap(self.modules.head).embed(feats, n_frames).float().cpu()
            out.update(zip(batch.id, emb))
        return out


def dataio_prepare(hparams):
    """Datasets (train crops, whole-utterance dev/test/trial audio) and the speaker encoder."""
    folder = hparams["manifest_folder"]
    datasets = {}
    for split in ("train", "dev", "test"):
        datasets[split] = sb.dataio.dataset.DynamicItemDataset.from_csv(os.path.join(folder, f"{split}.csv"))
    # whole training utterances, for the convex reference
    datasets["train_whole"] = sb.dataio.dataset.DynamicItemDataset.from_csv(os.path.join(folder, "train.csv"))
    trials_csv = os.path.join(folder, "veri_trials.csv")
    if hparams["trial_file"] and os.path.isfile(trials_csv):
        datasets["veri"] = sb.dataio.dataset.DynamicItemDataset.from_csv(os.path.join(folder, "veri_utts.csv"))

    sr, crop = hparams["sample_rate"], hparams["crop_seconds"]

    @sb.utils.data_pipeline.takes("wav", "duration")
    @sb.utils.data_pipeline.provides("sig")
    def crop_pipeline(wav, duration):
        """A random ``crop_seconds`` window (the whole file when shorter)."""
        return read_crop(wav, duration, crop, sr)

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def whole_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    label_encoder = sb.dataio.encoder.CategoricalEncoder()

    @sb.utils.data_pipeline.takes("spk_id")
    @sb.utils.data_pipeline.provides("spk_id", "spk_id_encoded")
    def label_pipeline(spk_id):
        yield spk_id
        yield label_encoder.encode_sequence_torch([spk_id])

    sb.dataio.dataset.add_dynamic_item([datasets["train"]], crop_pipeline)
    evaluated = [d for k, d in datasets.items() if k != "train"]
    sb.dataio.dataset.add_dynamic_item(evaluated, whole_pipeline)
    for name in ("dev", "test", "train_whole") + (("veri",) if "veri" in datasets else ()):
        datasets[name] = datasets[name].filtered_sorted(sort_key="duration")  # less padding
    labelled = ("train", "dev", "test", "train_whole")
    sb.dataio.dataset.add_dynamic_item([datasets[s] for s in labelled], label_pipeline)
    label_encoder.load_or_create(
        path=os.path.join(hparams["save_folder"], "label_encoder.txt"),
        from_didatasets=[datasets["train"]],
        output_key="spk_id",
    )
    with datasets["train"].output_keys_as(["spk_id"]):
        speakers = {item["spk_id"] for item in datasets["train"]}
    if set(label_encoder.lab2ind) != speakers:
        raise ValueError(
            f"{hparams['save_folder']}/label_encoder.txt lists {len(label_encoder)} speakers but the training "
            f"manifest has {len(speakers)}: this output_folder holds a run on other data; use another --output_folder"
        )
    sb.dataio.dataset.set_output_keys([datasets[s] for s in labelled], ["id", "sig", "spk_id_encoded"])
    if "veri" in datasets:
        sb.dataio.dataset.set_output_keys([datasets["veri"]], ["id", "sig"])
    return datasets, label_encoder


def run_verification(brain, hparams, datasets):
    """Scores every trial; returns {eer, min_dcf, ...} and writes the scores."""
    with open(os.path.join(hparams["manifest_folder"], "veri_trials.csv"), newline="") as f:
        trials = list(csv.DictReader(f))
    brain.on_evaluate_start(max_key="acc")
    emb = brain.embed_dataset(datasets["veri"], hparams["eval_batch_size"])
    matrix = torch.stack(list(emb.values()))
    center = matrix.mean(0) if hparams["verification_center"] else None
    enrol = torch.stack([emb[t["enrol"]] for t in trials])
    test = torch.stack([emb[t["test"]] for t in trials])
    scores = cosine_scores(enrol, test, center)
    labels = torch.tensor([int(t["label"]) for t in trials], dtype=torch.bool)
    eer, threshold = compute_eer(scores[labels], scores[~labels])
    min_dcf, _ = compute_min_dcf(scores[labels], scores[~labels], p_target=hparams["dcf_p_target"],
                                 c_miss=hparams["dcf_c_miss"], c_fa=hparams["dcf_c_fa"])
    path = os.path.join(hparams["output_folder"], "veri_scores.txt")
    if if_main_process():  # every process scored every trial (the trial audio is not sharded)
        with open(path, "w") as f:
            for t, s in zip(trials, scores.tolist()):
                f.write(f"{t['enrol']} {t['test']} {t['label']} {s:.6f}\n")
    results = {"eer": eer, "eer_threshold": threshold, "min_dcf": min_dcf, "dcf_p_target": hparams["dcf_p_target"],
               "n_trials": len(trials), "n_target": int(labels.sum()),
               "embedding": "x-vector" if hparams["head"] == "xvector" else "standardised pooled statistics",
               "trial_speakers_in_training": not hparams["exclude_trial_speakers"]}
    logger.info(f"verification: EER {100 * eer:.2f}%, minDCF(p={hparams['dcf_p_target']}) {min_dcf:.4f} "
                f"on {len(trials)} trials (scores in {path})")
    return results


def build_brain(hparams, run_opts, n_speakers, train_labels=()):
    """The Brain with the chosen speaker head added to modules and checkpointer.

    ``train_labels``: every training utterance's speaker index, for the
    class-balanced cross-entropy (``class_balanced_loss``).
    """
    head = select_head(hparams["heads"], hparams["head"], input_size=hparams["upstream_model"].output_size,
                       n_classes=n_speakers)
    logger.info(f"head {hparams['head']}: {count_parameters(head)} parameters")
    hparams["modules"]["head"] = head
    upstream = hparams["upstream_model"]
    # A frozen pretrained folder is reloaded from that folder; baselines and
    # fine-tuned encoders are checkpointed whole (normaliser statistics included).
    frozen_pretrained = hparams["freeze"] and str(hparams["upstream"]) not in BASELINES
    hparams["checkpointer"].add_recoverable("upstream", upstream.features if frozen_pretrained else upstream)
    hparams["checkpointer"].add_recoverable("head", head)
    brain = SpeakerBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    weights = balanced_class_weights(train_labels, n_speakers, hparams["class_balanced_loss"]) if train_labels else None
    brain.class_weights = None if weights is None else weights.to(brain.device)
    return brain


def main(argv, mode="train"):
    """``mode``: ``train`` (fit, test, verification) or ``verify`` (verification only)."""
    hparams, run_opts = start_experiment(argv)  # args, DDP group, YAML, threads, output folder
    if mode == "train":
        done = finished_rerun(hparams)  # the same command again: nothing to do, and it says so
        if done is not None:
            return done
    announce_data(hparams["data_folder"])
    run_on_main(
        prepare_voxceleb,
        kwargs=dict(
            data_folder=hparams["data_folder"],
            save_folder=hparams["manifest_folder"],
            split_file=hparams["split_file"],
            trial_file=hparams["trial_file"],
            wav_folders=hparams["wav_folders"],
            exclude_trial_speakers=hparams["exclude_trial_speakers"],
            min_duration=hparams["min_duration"],
            max_duration=hparams["max_duration"],
            sample_rate=hparams["sample_rate"],
            num_workers=hparams["prep_workers"],
            skip_prep=hparams["skip_prep"],
        ),
    )
    datasets, label_encoder = dataio_prepare(hparams)
    hparams["label_encoder"] = label_encoder
    n_speakers = len(label_encoder)
    with datasets["train"].output_keys_as(["spk_id"]):
        train_labels = [label_encoder.lab2ind[item["spk_id"]] for item in datasets["train"]]
    brain = build_brain(hparams, run_opts, n_speakers, train_labels)
    results = {"head": hparams["head"], "upstream": describe_source(hparams["upstream"]), "n_speakers": n_speakers,
               "chance_acc": 1.0 / n_speakers, "trial_speakers_in_training": not hparams["exclude_trial_speakers"]}
    if mode == "train":
        logger.info(f"speaker identification: {n_speakers} speakers, {len(datasets['train'])} training utterances")
        eval_opts = {"batch_size": hparams["eval_batch_size"], "num_workers": hparams["num_workers"]}
        brain.fit(
            brain.hparams.epoch_counter,
            datasets["train"],
            datasets["dev"],
            train_loader_kwargs={"batch_size": hparams["batch_size"], "shuffle": True,
                                 "num_workers": hparams["num_workers"]},
            valid_loader_kwargs=eval_opts,
        )
        brain.evaluate(datasets["test"], max_key="acc", test_loader_kwargs=eval_opts)
        results.update(sid_test_acc=brain.test_stats["acc"], sid_test_loss=brain.test_stats["loss"],
                       n_test=len(datasets["test"]), layer_weights=brain.layer_weights())
        logger.info(f"speaker identification: test accuracy {100 * brain.test_stats['acc']:.2f}% "
                    f"(chance {100 / n_speakers:.2f}%)")
        if hparams["convex_reference"] and if_main_process():  # same pooled features, logistic regression
            convex = brain.convex_reference(datasets["train_whole"], datasets["test"],
                                            lambda b: b.spk_id_encoded.data.view(-1), n_speakers,
                                            l2=hparams["convex_l2"], batch_size=hparams["eval_batch_size"])
            results["convex_reference"] = float((convex["pred"] == convex["target"]).double().mean())
            results["convex_reference_info"] = {k: convex[k] for k in ("n_train", "l2", "features")}
            logger.info(f"convex reference (logistic regression on the pooled features): test accuracy "
                        f"{100 * results['convex_reference']:.2f}%")
    if hparams["verification"] and "veri" in datasets:
        results.update(run_verification(brain, hparams, datasets))
    elif mode == "verify":
        raise ValueError("no verification trials: set --trial_file (veri_test2.txt) and --verification=True")
    lines = [f"# VoxCeleb1 {'verification' if mode == 'verify' else ''}, upstream {upstream_tag(hparams['upstream'])}, "
             f"head {results['head']}".replace("VoxCeleb1 ,", "VoxCeleb1,"), "",
             "| metric | value |", "|---|---|"]
    keys = ("eer", "min_dcf") if mode == "verify" else ("sid_test_acc", "convex_reference", "chance_acc", "eer", "min_dcf")
    for key in keys:  # chance_acc is identification's chance level: not in the verification table
        if key in results:
            lines.append(f"| {key} | {100 * results[key]:.2f}% |" if key != "min_dcf" else f"| {key} | {results[key]:.4f} |")
    if if_main_process():
        write_results(hparams["output_folder"], "results" if mode == "train" else "verification", results,
                      "\n".join(lines) + "\n")
        if mode == "train":
            mark_finished(hparams, brain.fit_state, [os.path.join(hparams["output_folder"], "results.md")])
        print("\n".join(lines), flush=True)  # the table, printed at the end (README), as TIMIT and LibriSpeech do
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
