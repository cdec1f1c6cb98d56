"""Turns a trained folder into a model folder that ``speechbrain.inference`` loads.

    python -m mgf_sb.export SOURCE DEST [--chunk_seconds 30] [--overlap_seconds 4]
    python recipes/export.py SOURCE DEST            # the same

SOURCE is one of

- a pretraining output: ``<output_folder>`` of ``recipes/pretrain/train.py`` or its
  ``pretrained/`` sub-folder (format: :mod:`mgf_sb.pretrained_folder`)  -> load with
  :class:`mgf_sb.inference.MGFEncoder`;
- a downstream classifier: ``<output_folder>`` of a classification recipe (IEMOCAP)
  or its ``model/`` sub-folder, holding ``upstream/`` (pretrained format; ``"encoder":
  null`` for the fbank baseline), ``head.ckpt`` ({"layer_selector", "classifier"}
  state_dicts), ``head_config.json`` and ``labels.txt``  -> load with
  :class:`mgf_sb.inference.MGFEmotionClassifier` (or ``MGFClassifier``).

DEST receives ``hyperparams.yaml`` (the modules, their sizes and a Pretrainer),
``mgf_config.json``, ``features.ckpt`` (weights + normaliser statistics),
``encoder.ckpt`` and, for classifiers, ``layer_selector.ckpt``, ``classifier.ckpt``,
``label_encoder.txt`` and ``head_config.json``. Every weight file is loaded
(``weights_only=True``, strict; NaN/Inf weights refused) and re-saved, and the
exported folder is then loaded back and checked to reproduce the source model's
outputs. Re-exporting into an earlier export replaces only the files export writes
(:data:`EXPORT_FILES`), each by an atomic rename from a temporary folder inside
DEST; anything else in DEST (notes, evaluation outputs) is left alone.
"""

import argparse
import datetime
import json
import logging
import math
import os
import shutil
import sys
import tempfile

import torch

from mgf_sb import pretrained_folder as ckpt
from mgf_sb.features import FeatureExtractor
from mgf_sb.heads import UtteranceClassifier
from mgf_sb.inference import MODEL_HEADER as HEADER
from mgf_sb.inference import read_hparams_text
from mgf_sb.upstream import LayerSelector

logger = logging.getLogger(__name__)

HEAD_FILES = ("head.ckpt", "head_config.json", "labels.txt")
# Every file export writes into a model folder (hyperparams.yaml is always written last).
# Re-exporting replaces these and nothing else: a user's other files stay.
EXPORT_FILES = (ckpt.CONFIG_FILE, ckpt.FEATURES_FILE, ckpt.ENCODER_FILE, "layer_selector.ckpt", "classifier.ckpt",
                "label_encoder.txt", "head_config.json", "hyperparams.yaml")


# ----------------------------------------------------------------------------------------------
# Reading the sources
# ----------------------------------------------------------------------------------------------
def find_source(source):
    """-> ("pretrained" | "classifier", folder); clear error naming what was looked for."""
    source = os.path.abspath(os.path.expanduser(str(source)))
    if not os.path.isdir(source):
        raise FileNotFoundError(f"export source {source!r} does not exist")
    for kind, sub, marker in (
        ("classifier", "", "head_config.json"),
        ("classifier", "model", "head_config.json"),
        ("pretrained", "", ckpt.CONFIG_FILE),
        ("pretrained", "pretrained", ckpt.CONFIG_FILE),
    ):
        folder = os.path.join(source, sub) if sub else source
        if os.path.isfile(os.path.join(folder, marker)):
            return kind, folder
    present = ", ".join(sorted(os.listdir(source))) or "nothing"
    raise FileNotFoundError(
        f"{source!r} is neither a pretraining output (expected {ckpt.CONFIG_FILE} in it or in "
        f"pretrained/) nor a downstream classifier (expected head_config.json in it or in model/); "
        f"it holds {present}"
    )


def _load_state(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot load {path}: {e}. Re-train or re-copy the folder.") from e
    if isinstance(state, dict):
        ckpt.check_finite(state, path)  # NaN/Inf weights: refused, naming the tensor
    return state


def load_upstream_folder(folder):
    """Like :func:`mgf_sb.pretrained_folder.load_pretrained`, but also accepts ``"encoder": null``
    (the fbank baseline: a FeatureExtractor with statistics and no encoder.ckpt).

    Returns (features, encoder or None, config).
    """
    config_path = os.path.join(folder, ckpt.CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"upstream folder {folder!r} is incomplete: missing {ckpt.CONFIG_FILE}")
    with open(config_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if config.get("encoder") is not None:
        return ckpt.load_pretrained(folder)
    if config.get("format") != ckpt.FORMAT or config.get("format_version", 0) > ckpt.FORMAT_VERSION:
        raise ValueError(f"{config_path}: unsupported format {config.get('format')!r} v{config.get('format_version')}")
    if "features" not in config:
        raise ValueError(f"{config_path} has no 'features' entry")
    path = os.path.join(folder, ckpt.FEATURES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"upstream folder {folder!r} is incomplete: missing {ckpt.FEATURES_FILE}")
    features = FeatureExtractor(**config["features"])
    features.load_state_dict(_load_state(path))
    features.eval()
    return features, None, config


def load_classifier_folder(folder):
    """Reads a downstream ``<output_folder>/model`` folder (contract: see the module docstring).

    Returns dict(features, encoder, config, layer_selector, classifier, head_config, labels).
    """
    missing = [f for f in HEAD_FILES if not os.path.isfile(os.path.join(folder, f))]
    if not os.path.isdir(os.path.join(folder, "upstream")):
        missing.insert(0, "upstream/")
    if missing:
        raise FileNotFoundError(
            f"downstream classifier folder {folder!r} is incomplete: missing {', '.join(missing)} "
            f"(written by the downstream recipe at the end of training)"
        )
    with open(os.path.join(folder, "head_config.json")) as f:
        head = json.load(f)
    for key in ("num_layers", "input_size", "n_classes"):
        if key not in head:
            raise ValueError(f"{os.path.join(folder, 'head_config.json')} has no '{key}'")
    with open(os.path.join(folder, "labels.txt"), encoding="utf-8") as f:
        labels = [line.strip() for line in f if line.strip()]
    if len(labels) != head["n_classes"] or len(set(labels)) != len(labels):
        raise ValueError(
            f"{os.path.join(folder, 'labels.txt')} lists {len(labels)} distinct labels, "
            f"head_config.json says n_classes={head['n_classes']}"
        )
    features, encoder, config = load_upstream_folder(os.path.join(folder, "upstream"))
    num_layers = 1 if encoder is None else encoder.num_outputs
    out_size = features.output_size if encoder is None else encoder.output_size
    if (head["num_layers"], head["input_size"]) != (num_layers, out_size):
        raise ValueError(
            f"head_config.json (num_layers={head['num_layers']}, input_size={head['input_size']}) does not "
            f"match upstream/ ({num_layers} layers of size {out_size})"
        )
    selector = LayerSelector(num_layers, head.get("layer"))
    classifier = UtteranceClassifier(
        head["input_size"], head["n_classes"], head.get("pooling", "mean+std"), head.get("hidden_size", 0)
    )
    state = _load_state(os.path.join(folder, "head.ckpt"))
    if not isinstance(state, dict) or not {"layer_selector", "classifier"} <= set(state):
        raise ValueError(f"{os.path.join(folder, 'head.ckpt')} must hold {{'layer_selector', 'classifier'}} state_dicts")
    for module, key in ((selector, "layer_selector"), (classifier, "classifier")):
        try:
            module.load_state_dict(state[key], strict=True)
        except RuntimeError as e:
            raise ValueError(f"head.ckpt['{key}'] does not match head_config.json: {e}") from e
    selector.eval(), classifier.eval()
    return dict(features=features, encoder=encoder, config=config, layer_selector=selector,
                classifier=classifier, head_config=head, labels=labels)


# ----------------------------------------------------------------------------------------------
# Writing the model folder
# ----------------------------------------------------------------------------------------------
def _yaml_value(v):
    return json.dumps(v)  # JSON scalars/lists are valid YAML (null, true, 1.5, "a")


def _yaml_module(name, cls, kwargs):
    lines = [f"{name}: !new:{cls}"]
    lines += [f"    {k}: {_yaml_value(v)}" for k, v in kwargs.items()]
    return "\n".join(lines)


def make_hyperparams(source, features_config, encoder_config, head=None, labels=None,
                     chunk_seconds=30.0, overlap_seconds=4.0, layer=None):
    """The exported ``hyperparams.yaml`` text."""
    kind = "encoder" if head is None else "classifier"
    text = [
        f"{HEADER} ({kind}), written by `python -m mgf_sb.export` on {datetime.date.today()}",
        f"# from {source}",
        "# Load it (local folders only, nothing is downloaded):",
    ]
    if head is None:
        text += [
            "#   from mgf_sb.inference import MGFEncoder",
            "#   enc = MGFEncoder.from_hparams(source=\"<this folder>\")",
            "#   layers = enc.encode_file(\"speech.wav\")",
        ]
    else:
        text += [
            "#   from mgf_sb.inference import MGFEmotionClassifier",
            "#   clf = MGFEmotionClassifier.from_hparams(source=\"<this folder>\")",
            "#   label, score, probs = clf.classify_file(\"speech.wav\")",
        ]
    text += [
        "",
        "pretrained_path: .   # set to this folder by from_hparams",
        f"model_type: {kind}",
        f"task: {_yaml_value(None if head is None else head.get('task'))}",
        f"sample_rate: {int(features_config.get('sample_rate', 16000))}",
        f"layer: {_yaml_value(layer)}   # encode_* default output: null = every layer (stacked), or an index",
        f"chunk_seconds: {float(chunk_seconds)}   # encode_file / classify_file: longer files go in chunks",
        f"overlap_seconds: {float(overlap_seconds)}   # shared context between chunks (each keeps its centre)",
        "",
        _yaml_module("features", "mgf_sb.features.FeatureExtractor", features_config),
        "",
    ]
    loadables = ["features"]
    if encoder_config is not None:
        text += [_yaml_module("encoder", "mgf_sb.encoder.MGFEncoder", encoder_config), ""]
        loadables.append("encoder")
    if head is not None:
        text += [
            _yaml_module("layer_selector", "mgf_sb.upstream.LayerSelector",
                         {"num_layers": head["num_layers"], "layer": head.get("layer")}),
            "",
            _yaml_module("classifier", "mgf_sb.heads.UtteranceClassifier", {
                "input_size": head["input_size"], "n_classes": head["n_classes"],
                "pooling": head.get("pooling", "mean+std"), "hidden_size": head.get("hidden_size", 0)}),
            "",
            f"labels: {_yaml_value(list(labels))}   # index order (also in label_encoder.txt)",
            "label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder",
            "",
        ]
        loadables += ["layer_selector", "classifier"]
    text += ["modules:"] + [f"    {m}: !ref <{m}>" for m in loadables] + [""]
    text += ["pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer", "    loadables:"]
    text += [f"        {m}: !ref <{m}>" for m in loadables]
    if head is not None:
        text += ["        label_encoder: !ref <label_encoder>"]
        text += ["    paths:", "        label_encoder: !ref <pretrained_path>/label_encoder.txt"]
    text += ["    custom_hooks:"]
    text += [f"        {m}: !name:mgf_sb.inference.load_state_dict_strict" for m in loadables]
    if head is not None:
        text += ["        label_encoder: !name:mgf_sb.inference.load_label_encoder"]
    return "\n".join(text) + "\n"


def _prepare_dest(dest, source_folder):
    dest = os.path.abspath(os.path.expanduser(str(dest)))
    if os.path.commonpath([dest, source_folder]) in (dest, source_folder):
        raise ValueError(f"export destination {dest!r} must be outside the source {source_folder!r}")
    if os.path.exists(dest):
        if not os.path.isdir(dest):
            raise FileExistsError(f"export destination {dest!r} exists and is not a folder")
        hp = os.path.join(dest, "hyperparams.yaml")
        try:
            ours = os.path.isfile(hp) and read_hparams_text(hp).startswith(HEADER)
        except ValueError:  # not UTF-8: not ours
            ours = False
        if os.listdir(dest) and not ours:
            raise FileExistsError(
                f"export destination {dest!r} exists and is not an mgf-sb model folder; "
                f"choose another path or remove it"
            )
    return dest


def export(source, dest, chunk_seconds=30.0, overlap_seconds=4.0, layer=None, check=True):
    """Exports ``source`` (pretraining or downstream classifier folder) to the model folder ``dest``.

    Returns the absolute path of ``dest``.
    """
    if not (math.isfinite(float(chunk_seconds)) and math.isfinite(float(overlap_seconds))
            and 0 <= float(overlap_seconds) < float(chunk_seconds)):
        raise ValueError(f"need finite 0 <= overlap_seconds < chunk_seconds, got {overlap_seconds}, {chunk_seconds}")
    kind, folder = find_source(source)
    dest = _prepare_dest(dest, folder)
    if kind == "pretrained":
        features, encoder, config = load_upstream_folder(folder)
        parts = dict(features=features, encoder=encoder, config=config)
    else:
        parts = load_classifier_folder(folder)
    features, encoder, config = parts["features"], parts["encoder"], parts["config"]
    if features.normalizer.count == 0:
        raise ValueError(f"{folder}: the feature extractor has no normalisation statistics")

    os.makedirs(dest, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".mgf-export-", dir=dest)  # same filesystem: each file is renamed in
    try:
        _write_model_files(tmp, folder, parts, chunk_seconds, overlap_seconds, layer)
        _install(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if check:
        check_export(dest, parts)
    logger.info(f"exported {kind} folder {folder} -> {dest}")
    return dest


def _install(tmp, dest):
    """Moves the files written in ``tmp`` into ``dest``, each with an atomic rename.

    ``hyperparams.yaml`` goes last. Files of an earlier export (:data:`EXPORT_FILES`)
    that this export does not write (``encoder.ckpt`` when an fbank model replaces an
    MGF one) are removed; anything else in ``dest`` is left alone.
    """
    written = sorted(os.listdir(tmp), key=lambda f: f == "hyperparams.yaml")
    for name in written:
        os.replace(os.path.join(tmp, name), os.path.join(dest, name))
    for name in EXPORT_FILES:
        if name not in written and os.path.isfile(os.path.join(dest, name)):
            os.remove(os.path.join(dest, name))


def _write_model_files(tmp, folder, parts, chunk_seconds, overlap_seconds, layer):
    """Writes every model file (:data:`EXPORT_FILES`) into the empty folder ``tmp``."""
    features, encoder, config = parts["features"], parts["encoder"], parts["config"]
    config = dict(config)
    config["meta"] = dict(config.get("meta") or {}, exported_from=folder)
    with open(os.path.join(tmp, ckpt.CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    torch.save(features.state_dict(), os.path.join(tmp, ckpt.FEATURES_FILE))
    if encoder is not None:
        torch.save(encoder.state_dict(), os.path.join(tmp, ckpt.ENCODER_FILE))
    head, labels = parts.get("head_config"), parts.get("labels")
    if head is not None:
        from speechbrain.dataio.encoder import CategoricalEncoder

        torch.save(parts["layer_selector"].state_dict(), os.path.join(tmp, "layer_selector.ckpt"))
        torch.save(parts["classifier"].state_dict(), os.path.join(tmp, "classifier.ckpt"))
        label_encoder = CategoricalEncoder()
        label_encoder.update_from_iterable(labels)
        label_encoder.save(os.path.join(tmp, "label_encoder.txt"))
        with open(os.path.join(tmp, "head_config.json"), "w") as f:
            json.dump(head, f, indent=2)
    with open(os.path.join(tmp, "hyperparams.yaml"), "w", encoding="utf-8") as f:
        f.write(make_hyperparams(folder, features.config, None if encoder is None else encoder.config,
                                 head, labels, chunk_seconds, overlap_seconds, layer))


def check_export(dest, parts, seconds=1.5):
    """Loads ``dest`` back through speechbrain.inference and compares with the source modules."""
    from mgf_sb.inference import MGFClassifier, MGFEncoder

    gen = torch.Generator().manual_seed(0)
    wav = 0.1 * torch.randn(1, int(seconds * parts["features"].sample_rate), generator=gen)
    lens = torch.ones(1)
    with torch.no_grad():
        feats, n = parts["features"](wav, lens, epoch=10**9)
        ref = [feats] if parts["encoder"] is None else parts["encoder"].eval()(feats, n)
        if "classifier" in parts:
            ref_probs = torch.softmax(parts["classifier"](parts["layer_selector"](ref), n), -1)
    if "classifier" in parts:
        got = MGFClassifier.from_hparams(source=dest).classify_batch(wav, lens)[0]
        ok = torch.allclose(got, ref_probs, atol=1e-5)
    else:
        got = MGFEncoder.from_hparams(source=dest).encode_batch(wav, lens, layer=None)
        ok = torch.allclose(got, torch.stack(ref), atol=1e-5)
    if not ok:
        raise RuntimeError(f"the exported model {dest} does not reproduce the source model's outputs")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m mgf_sb.export",
        description="Export a pretraining output or a downstream classifier to a model folder "
        "loadable with mgf_sb.inference (MGFEncoder / MGFEmotionClassifier .from_hparams).",
    )
    parser.add_argument("source", help="pretraining <output_folder> (or its pretrained/), or a downstream "
                        "classifier <output_folder> (or its model/)")
    parser.add_argument("dest", help="model folder to write (an earlier export: its model files are replaced, "
                        "other files kept)")
    parser.add_argument("--chunk_seconds", type=float, default=30.0,
                        help="encode_file/classify_file: files longer than this are encoded in chunks")
    parser.add_argument("--overlap_seconds", type=float, default=4.0, help="overlap between chunks")
    parser.add_argument("--layer", type=int, default=None,
                        help="default output layer of encode_* (default: all layers)")
    parser.add_argument("--no_check", action="store_true", help="skip loading the export back to compare outputs")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.chunk_seconds) and math.isfinite(args.overlap_seconds)):
        parser.error("--chunk_seconds and --overlap_seconds must be finite numbers")
    if not 0 <= args.overlap_seconds < args.chunk_seconds:
        parser.error("need 0 <= --overlap_seconds < --chunk_seconds")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        dest = export(args.source, args.dest, args.chunk_seconds, args.overlap_seconds, args.layer,
                      check=not args.no_check)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    print(f"model folder written: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
