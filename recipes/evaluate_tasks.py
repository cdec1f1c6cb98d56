"""``recipes/evaluate.py``'s task adapters: for each downstream task, the recipe to run, its
YAML, its corpus key, and how to read its metrics (percentages) from its result files.
Adding a task is a few lines here plus its corpus folder and heads in ``hparams/evaluate.yaml``.
"""

import glob
import json
import os
import sys
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from mgf_sb.pretrained_folder import REQUIRED_FILES  # noqa: E402
from mgf_sb.report import Column  # noqa: E402

BASELINES = ("fbank", "random")
SCALES = ("frame", "phoneme", "word", "utterance")


# ----------------------------------------------------------------------------------------------
# Task adapters: the recipe to run and how to read its metrics (percentages)
# ----------------------------------------------------------------------------------------------
def _load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _convex(value, *keys):
    """A recipe's ``convex_reference`` (a fraction, or a dict holding one under ``keys``) -> %."""
    if isinstance(value, dict):
        value = next((value[k] for k in keys if isinstance(value.get(k), (int, float))), None)
    return None if value is None or isinstance(value, bool) else 100 * float(value)


def read_timit(folder):
    r = _load_json(os.path.join(folder, "results.json"))
    return {"timit_acc": 100 * r["test"]["acc"], "_layer_weights": [r.get("layer_weights")]}


def read_voxceleb(folder):
    r = _load_json(os.path.join(folder, "results.json"))
    out = {"sid_acc": 100 * r["sid_test_acc"], "_layer_weights": [r.get("layer_weights")]}
    if r.get("eer") is not None:
        out["eer"] = 100 * r["eer"]
    convex = _convex(r.get("convex_reference"), "sid_test_acc", "test_acc", "acc", "accuracy")
    if convex is not None:
        out["sid_acc_convex"] = convex
    return out


def read_librispeech(folder):
    r = _load_json(os.path.join(folder, "results.json"))
    splits = r["splits"]
    name = "test-clean" if "test-clean" in splits else sorted(splits)[0]
    s = splits[name]
    wer = s["beam_WER"] if s.get("beam_WER") is not None else s["greedy_WER"]
    return {"wer": wer, "wer_split": name, "_layer_weights": [r.get("layer_weights")]}


def read_iemocap(folder):
    """The folds' mean UA/WA; ``_samples`` keeps each fold's value (the spread is over folds)."""
    r = _load_json(os.path.join(folder, "folds_results.json"))
    out = {"ua": 100 * r["UA_mean"], "ua_std": 100 * r["UA_std"], "wa": 100 * r["WA_mean"],
           "wa_std": 100 * r["WA_std"], "n_folds": r["n_folds"], "_samples": {}}
    if r.get("folds"):
        out["_samples"] = {"ua": [100 * f["UA"] for f in r["folds"]], "wa": [100 * f["WA"] for f in r["folds"]]}
    folds = [_load_json(p) for p in sorted(glob.glob(os.path.join(folder, "**", "test_results.json"), recursive=True))]
    out["_layer_weights"] = [f.get("layer_weights") for f in folds]
    with_convex = r.get("folds") if all("convex_reference" in f for f in r.get("folds") or [{}]) else folds
    convex = [_convex(f.get("convex_reference"), "UA", "ua") for f in with_convex]
    convex = [c for c in convex if c is not None]
    if convex:
        out["ua_convex"] = sum(convex) / len(convex)
        out["_samples"]["ua_convex"] = convex
    return out


@dataclass
class Task:
    """One downstream task: ``script hparams --<corpus arg>=... --<output_arg>=<folder> ...``.

    ``columns``: its metrics; ``convex``: metric key -> the key of the convex reference
    (full-batch logistic regression on the same pooled features) its results carry;
    ``spread``: where its spread comes from without several seeds (``folds`` or None).
    """

    script: str
    hparams: str
    corpus: str  # the evaluate.yaml key holding this task's corpus folder
    columns: list
    read: callable
    output_arg: str = "output_folder"
    extra_args: callable = field(default=lambda folder: {})
    convex: dict = field(default_factory=dict)
    spread: str = None
    title: str = ""


TASKS = {
    "timit": Task("recipes/TIMIT/train.py", "hparams/timit.yaml", "timit_folder",
                  [Column("timit_acc", "TIMIT frame acc (%)")], read_timit, title="TIMIT"),
    "voxceleb": Task("recipes/VoxCeleb/train.py", "hparams/voxceleb.yaml", "voxceleb_folder",
                     [Column("sid_acc", "VoxCeleb1 SID acc (%)"), Column("eer", "VoxCeleb1 EER (%)", False, no_skill=50.0)],
                     read_voxceleb, convex={"sid_acc": "sid_acc_convex"}, title="VoxCeleb1"),
    "librispeech": Task("recipes/LibriSpeech/train.py", "hparams/librispeech_ctc.yaml", "librispeech_folder",
                        [Column("wer", "LibriSpeech WER (%)", False, no_skill=100.0)], read_librispeech, title="LibriSpeech"),
    "iemocap": Task("recipes/IEMOCAP/run_folds.py", "hparams/emotion.yaml", "iemocap_folder",
                    [Column("ua", "IEMOCAP UA (%)"), Column("wa", "IEMOCAP WA (%)")], read_iemocap,
                    output_arg="experiment_folder",
                    extra_args=lambda folder: {"manifest_folder": os.path.join(folder, "manifest")},
                    convex={"ua": "ua_convex"}, spread="folds", title="IEMOCAP"),
}

# Short labels for the bar charts.
SHORT = {"timit_acc": "TIMIT acc", "sid_acc": "SID acc", "eer": "EER", "wer": "WER", "ua": "emo UA", "wa": "emo WA"}


def task_heads(hp, task, ablation=False):
    """The heads a task runs with (``heads:``; ablation rows: ``ablation_heads:`` or the first head)."""
    heads = list((hp.get("heads") or {}).get(task) or [None])
    if ablation:
        chosen = hp.get("ablation_heads")
        heads = list(chosen.get(task) or heads[:1]) if isinstance(chosen, dict) else heads[:1]
    return heads


def probe_name(task, head):
    return task if head is None else f"{task}/{head}"


def step_output(step):
    """A finished step's output: the pretrained folder, or the task's metrics."""
    if step.kind == "pretrain":
        missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(step.result_path, f))]
        if missing:
            raise FileNotFoundError(f"{step.result_path} lacks {missing}")
        return step.result_path
    return TASKS[step.task].read(step.folder)
