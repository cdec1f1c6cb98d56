#!/usr/bin/env python3
"""LibriSpeech CTC speech recognition on top of an upstream (fbank | random | MGF | hf:<local folder>).

    python recipes/LibriSpeech/train.py hparams/librispeech_ctc.yaml [--overrides]

Upstream (frozen with a learned weighted sum of its layers, or fine-tuned) ->
CTC head (``--head=bilstm``: SUPERB's 2-layer BiLSTM, the default; ``--head=linear``:
a linear layer) -> CTC loss over SentencePiece
units (characters or unigram pieces, trained on the training transcripts and
saved with the run). Validation decodes greedily; the test splits are decoded
greedily and with SpeechBrain's CTC beam search, and their WER/CER go to
``wer_<split>.txt`` (beam search) and ``wer_<split>_greedy.txt``, with a
summary in ``results.json`` / ``results.md``. Re-running the command resumes
from the last checkpoint; the test uses the checkpoint with the best valid
``select_metric``. The lr is annealed on the dev ``schedule_metric`` with a
floor, and training stops early when it stops improving (hparams/librispeech_ctc.yaml).

Several GPUs (or CPU processes with ``--distributed_backend=gloo``)::

    torchrun --nproc_per_node=4 recipes/LibriSpeech/train.py hparams/librispeech_ctc.yaml

shards the training set over the processes (``batch_size`` is per process);
rank 0 prepares the data and the tokenizer; valid/test are not sharded, so
every process decodes the whole set and rank 0 writes the results.
``--precision=bf16`` trains under autocast.
"""

import contextlib
import functools
import logging
import os
import sys

import speechbrain as sb
import torch
from speechbrain.decoders.ctc import ctc_greedy_decode
from speechbrain.tokenizers.SentencePiece import SentencePiece
from speechbrain.utils.distributed import if_main_process, run_on_main

from mgf_sb.data.manifest import read_manifest
from mgf_sb.distributed import ddp_sum
from mgf_sb.downstream import DownstreamBrain, announce_data, write_results
from mgf_sb.finished import finished_rerun, mark_finished
from mgf_sb.upstream import describe_source, upstream_tag
from mgf_sb.recipe import start_experiment

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from librispeech_prepare import filter_for_ctc, prepare_librispeech  # noqa: E402

logger = logging.getLogger(__name__)


def greedy_hypotheses(log_probs, n_frames, blank_index, decode_ids):
    """Best path: (texts, path log-probabilities) for (B, T, V) log-probs."""
    T = log_probs.shape[1]
    seqs = ctc_greedy_decode(log_probs, n_frames.float() / T, blank_id=blank_index)
    scores = [float(lp[:n].max(-1).values.sum()) for lp, n in zip(log_probs, n_frames.tolist())]
    return [" ".join(decode_ids(s).split()) for s in seqs], scores


def beam_hypotheses(searcher, log_probs, n_frames):
    """SpeechBrain's CTC beam search: (texts, beam scores) (valid frames only)."""
    texts, scores = [], []
    for lp, n in zip(log_probs.detach().float().cpu(), n_frames.tolist()):
        hyp = searcher.decode_log_probs(lp[:n].numpy(), n)[0]
        texts.append(hyp.text)
        scores.append(float(hyp.score))
    return texts, scores


class ASRBrain(DownstreamBrain):
    """Upstream -> layer selector -> CTC head; greedy and beam-search decoding."""

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        feats, n_frames = self.encode(wavs, wav_lens, stage)
        p_ctc = self.modules.ctc_head(feats, n_frames)
        return p_ctc, n_frames

    def compute_objectives(self, predictions, batch, stage):
        p_ctc, n_frames = predictions
        tokens, tokens_lens = batch.tokens
        loss = sb.nnet.losses.ctc_loss(
            p_ctc, tokens, n_frames.float() / p_ctc.shape[1], tokens_lens, self.hparams.blank_index
        )
        if stage != sb.Stage.TRAIN:
            refs = [w.split() for w in batch.wrd]
            hyps, _ = greedy_hypotheses(p_ctc, n_frames, self.hparams.blank_index, self.tokenizer.sp.decode_ids)
            self.wer_metric.append(batch.id, [h.split() for h in hyps], refs)
            self.cer_metric.append(batch.id, [h.split() for h in hyps], refs)
            if stage == sb.Stage.TEST and self.searcher is not None:
                beams, _ = beam_hypotheses(self.searcher, p_ctc, n_frames)
                self.beam_wer_metric.append(batch.id, [h.split() for h in beams], refs)
                self.beam_cer_metric.append(batch.id, [h.split() for h in beams], refs)
        return loss

    def on_stage_start(self, stage, epoch=None):
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.error_rate_computer()
            self.cer_metric = self.hparams.cer_computer()
            self.beam_wer_metric = self.hparams.error_rate_computer()
            self.beam_cer_metric = self.hparams.cer_computer()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:  # DDP: mean over the processes' shards (equal batch counts)
            loss_sum, world = ddp_sum([stage_loss, 1.0])
            self.train_stats = {"loss": loss_sum / world}
            return
        stats = {"loss": stage_loss}
        stats["WER"] = self.wer_metric.summarize("error_rate")
        stats["CER"] = self.cer_metric.summarize("error_rate")
        if stage == sb.Stage.VALID:
            weights = self.layer_weights()
            meta = {"epoch": epoch, "lr": self.anneal_and_stop(stats[self.hparams.schedule_metric])}
            if weights is not None and len(weights) > 1:
                meta["layer_weights"] = " ".join(f"{w:.2f}" for w in weights)
            self.hparams.train_logger.log_stats(stats_meta=meta, train_stats=self.train_stats, valid_stats=stats)
            self.checkpointer.save_and_keep_only(meta=dict(stats), min_keys=[self.hparams.select_metric],
                                                 num_to_keep=self.hparams.ckpt_to_keep)
            return
        # TEST: one split at a time (self.test_split)
        split = self.test_split
        if self.searcher is not None:
            stats["beam_WER"] = self.beam_wer_metric.summarize("error_rate")
            stats["beam_CER"] = self.beam_cer_metric.summarize("error_rate")
        self.hparams.train_logger.log_stats(
            stats_meta={"split": split, "checkpoint epoch": self.hparams.epoch_counter.current}, test_stats=stats
        )
        if if_main_process():
            out = self.hparams.output_folder
            main_wer = self.beam_wer_metric if self.searcher is not None else self.wer_metric
            with open(os.path.join(out, f"wer_{split}.txt"), "w", encoding="utf-8") as w:
                w.write(f"# {split}: {'CTC beam search (beam ' + str(self.hparams.beam_size) + ')' if self.searcher is not None else 'greedy'} decoding\n")
                main_wer.write_stats(w)
            with open(os.path.join(out, f"wer_{split}_greedy.txt"), "w", encoding="utf-8") as w:
                w.write(f"# {split}: greedy decoding\n")
                self.wer_metric.write_stats(w)
        self.test_results[split] = {
            "greedy_WER": stats["WER"], "greedy_CER": stats["CER"],
            "beam_WER": stats.get("beam_WER"), "beam_CER": stats.get("beam_CER"),
            "utterances": len(self.wer_metric.scores), "loss": stage_loss,
        }


@contextlib.contextmanager
def output_to(path):
    """Sends this process's stdout and stderr, at the file-descriptor level (C++ libraries' output
    included), to ``path`` (appended) for the duration of the block."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "a", encoding="utf-8") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def train_tokenizer(hparams):
    """SentencePiece (chars or unigram) on the training transcripts, saved in the run folder."""
    char = hparams["token_type"] == "char"
    alphabet = hparams["alphabet"]
    if char and "," in alphabet:
        raise ValueError("alphabet: ',' cannot be a character token (SentencePiece's symbol separator)")
    make = functools.partial(
        SentencePiece,
        model_dir=hparams["tokenizer_folder"],
        vocab_size=hparams["output_neurons"],
        annotation_train=os.path.join(hparams["manifest_folder"], "train.csv"),
        annotation_read="wrd",
        model_type=hparams["token_type"],
        character_coverage=hparams["character_coverage"],
        # chars: the whole alphabet is in the vocabulary, seen in training or not
        user_defined_symbols=",".join(alphabet) if char else None,
        unk_id=hparams["blank_index"],  # blank shares index 0 with <unk> (no <unk> survives the prep)
    )
    log = os.path.join(hparams["tokenizer_folder"], "sentencepiece_log.txt")
    with output_to(log):  # SentencePiece's C++ log (absl banner, the whole trainer_spec): ~100 lines
        run_on_main(make)  # trained once, by rank 0 (DDP); the other processes wait, then load it
        tokenizer = make()
    logger.info(f"tokenizer: SentencePiece {hparams['token_type']}, {tokenizer.sp.vocab_size()} tokens, in "
                f"{hparams['tokenizer_folder']} (SentencePiece's own output: {log})")
    n = tokenizer.sp.vocab_size()
    if n != hparams["output_neurons"]:
        raise ValueError(
            f"the tokenizer in {hparams['tokenizer_folder']} has {n} tokens but output_neurons is "
            f"{hparams['output_neurons']}: pass --output_neurons={n} (char: len(alphabet) + 2), or delete that "
            f"folder if it is a stale tokenizer from another setting"
        )
    return tokenizer


def dataio_prepare(hparams, tokenizer, test_names):
    """CTC-filtered datasets (train sorted by duration) with audio and token pipelines."""
    folder = hparams["manifest_folder"]
    frame_rate = hparams["upstream_model"].frame_rate
    datasets = {}
    for name in ["train", "valid"] + test_names:
        run_on_main(filter_for_ctc, args=[
            os.path.join(folder, f"{name}.csv"), os.path.join(folder, f"{name}_ctc.csv"),
            tokenizer.sp.encode_as_ids, frame_rate], kwargs=dict(unk_id=hparams["blank_index"], name=f"{name}_ctc"))
        if not read_manifest(os.path.join(folder, f"{name}_ctc.csv")):
            raise ValueError(f"{name}: no utterance left for CTC; see {os.path.join(folder, name + '_ctc_skipped.tsv')}")
        ds = sb.dataio.dataset.DynamicItemDataset.from_csv(os.path.join(folder, f"{name}_ctc.csv"))
        if name == "train" and hparams["sorting"] != "random":
            ds = ds.filtered_sorted(sort_key="duration", reverse=hparams["sorting"] == "descending")
        else:
            ds = ds.filtered_sorted(sort_key="duration")  # less padding when decoding
        datasets[name] = ds

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("wrd", "tokens")
    def text_pipeline(wrd):
        yield wrd
        yield torch.LongTensor(tokenizer.sp.encode_as_ids(wrd))

    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(list(datasets.values()), text_pipeline)
    sb.dataio.dataset.set_output_keys(list(datasets.values()), ["id", "sig", "wrd", "tokens"])
    return datasets


def main(argv):
    hparams, run_opts = start_experiment(argv)  # args, DDP group, YAML, threads, output folder
    if finished_rerun(hparams):  # the same command again: nothing to do, and it says so
        return None
    announce_data(hparams["data_folder"])

    prep = dict(
        data_folder=hparams["data_folder"],
        save_folder=hparams["manifest_folder"],
        train_splits=hparams["train_splits"],
        valid_splits=hparams["valid_splits"],
        test_splits=hparams["test_splits"],
        alphabet=hparams["alphabet"],
        uppercase=hparams["uppercase"],
        min_duration=hparams["min_duration"],
        max_duration=hparams["max_duration"],
        sample_rate=hparams["sample_rate"],
        num_workers=hparams["prep_workers"],
    )
    if not hparams["skip_prep"]:
        run_on_main(prepare_librispeech, kwargs=prep)  # rank 0 prepares; the others wait
    # the test splits prepared (present in data_folder): those with a manifest (not a second prep call,
    # which logged every split again and then "up to date; skipping preparation")
    test_names = [s for s in hparams["test_splits"]
                  if os.path.isfile(os.path.join(hparams["manifest_folder"], f"{s}.csv"))]
    tokenizer = train_tokenizer(hparams)
    datasets = dataio_prepare(hparams, tokenizer, test_names)

    brain = ASRBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    brain.tokenizer = tokenizer
    brain.searcher = None
    logger.info(f"upstream {upstream_tag(hparams['upstream'])} ({hparams['upstream_model'].num_layers} layers, "
                f"{hparams['upstream_model'].frame_rate:g} Hz, {'frozen' if hparams['freeze'] else 'fine-tuned'}); "
                f"{hparams['output_neurons']} {hparams['token_type']} tokens")
    brain.fit(
        brain.hparams.epoch_counter,
        datasets["train"],
        datasets["valid"],
        train_loader_kwargs=hparams["train_dataloader_opts"],
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )

    if hparams["beam_size"] > 0:
        vocab = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.sp.vocab_size())]
        brain.searcher = hparams["test_searcher"](blank_index=hparams["blank_index"], vocab_list=vocab)
    brain.test_results = {}
    for name in test_names:
        brain.test_split = name
        brain.evaluate(datasets[name], min_key=hparams["select_metric"],
                       test_loader_kwargs=hparams["test_dataloader_opts"])

    results = {"head": hparams["head"], "upstream": describe_source(hparams["upstream"]), "freeze": hparams["freeze"],
               "layer": hparams["layer"], "layer_weights": brain.layer_weights(), "token_type": hparams["token_type"],
               "beam_size": hparams["beam_size"], "splits": brain.test_results}
    rows = "\n".join(
        f"| {s} | {r['utterances']} | {r['greedy_WER']:.2f} | {r['greedy_CER']:.2f} | "
        f"{'-' if r['beam_WER'] is None else format(r['beam_WER'], '.2f')} | "
        f"{'-' if r['beam_CER'] is None else format(r['beam_CER'], '.2f')} |"
        for s, r in brain.test_results.items()
    )
    md = (f"# LibriSpeech CTC, upstream {upstream_tag(hparams['upstream'])} ({'frozen' if hparams['freeze'] else 'fine-tuned'}), "
          f"head {results['head']}\n\n"
          f"| split | utterances | WER greedy | CER greedy | WER beam {hparams['beam_size']} | CER beam |\n"
          f"|---|---|---|---|---|---|\n{rows}\n")
    if if_main_process():
        write_results(hparams["output_folder"], "results", results, md)
        mark_finished(hparams, brain.fit_state, [os.path.join(hparams["output_folder"], "results.md")])
        print(md, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
