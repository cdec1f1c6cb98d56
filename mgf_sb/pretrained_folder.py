"""The pretrained-folder format: the one place that writes and reads it.

A pretrained MGF folder holds everything a downstream recipe (or
``speechbrain.inference``) needs to rebuild the encoder, and nothing that
executes code on load::

    <folder>/
      mgf_config.json    format version + FeatureExtractor and MGFEncoder kwargs
      features.ckpt      FeatureExtractor state_dict (incl. normaliser statistics)
      encoder.ckpt       MGFEncoder state_dict

Weights are loaded with ``torch.load(..., weights_only=True)``. Files are
written to a temporary name and renamed, so a kill during a save never leaves a
half-written folder behind.
"""

import hashlib
import json
import os

import torch

from mgf_sb.encoder import MGFEncoder
from mgf_sb.features import FeatureExtractor

FORMAT = "mgf-sb-pretrained"
FORMAT_VERSION = 1
CONFIG_FILE = "mgf_config.json"
FEATURES_FILE = "features.ckpt"
ENCODER_FILE = "encoder.ckpt"
REQUIRED_FILES = (CONFIG_FILE, FEATURES_FILE, ENCODER_FILE)


def _atomic_torch_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_pretrained(folder, features, encoder, meta=None):
    """Writes a pretrained folder.

    Arguments
    ---------
    folder : str
    features : FeatureExtractor
        Must hold normalisation statistics (i.e. have seen training data).
    encoder : MGFEncoder
    meta : dict, optional
        Free-form JSON-serialisable information (step, epoch, losses...).
    """
    if features.normalizer.count == 0:
        raise ValueError("refusing to save a FeatureExtractor without normalisation statistics")
    os.makedirs(folder, exist_ok=True)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "features": features.config,
        "encoder": encoder.config,
        "meta": meta or {},
    }
    _atomic_torch_save(features.state_dict(), os.path.join(folder, FEATURES_FILE))
    _atomic_torch_save(encoder.state_dict(), os.path.join(folder, ENCODER_FILE))
    tmp = os.path.join(folder, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, os.path.join(folder, CONFIG_FILE))


def read_config(folder):
    """Reads and validates ``mgf_config.json``; clear errors for anything missing."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"pretrained MGF folder {folder!r} does not exist; expected a folder written by "
            f"recipes/pretrain/train.py (<output_folder>/pretrained) holding {', '.join(REQUIRED_FILES)}"
        )
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(
            f"pretrained MGF folder {folder!r} is incomplete: missing {', '.join(missing)}. "
            f"Point to the 'pretrained' folder that recipes/pretrain/train.py writes."
        )
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{os.path.join(folder, CONFIG_FILE)} is not valid JSON: {e}") from e
    if config.get("format") != FORMAT or config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{os.path.join(folder, CONFIG_FILE)}: unsupported format "
            f"{config.get('format')!r} v{config.get('format_version')}; this mgf-sb reads {FORMAT} v<={FORMAT_VERSION}"
        )
    return config


def check_finite(state, path):
    """Raises ValueError naming the first tensor of ``state`` with NaN or Inf values.

    A model with one non-finite weight gives all-NaN outputs; refusing it at
    load time names the culprit instead.
    """
    for name, value in state.items():
        if isinstance(value, dict):
            check_finite(value, f"{path}[{name!r}]")
        elif torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"{path}: tensor {name!r} has {bad} NaN or Inf value(s) of {value.numel()}; the weights are "
                f"corrupted (a diverged run or a damaged copy). Use an earlier checkpoint or re-copy the folder."
            )


def weights_digest(folder):
    """Content hash of a pretrained folder's weights (``features.ckpt``, ``encoder.ckpt``).

    Hashes every tensor's name, dtype, shape and values (not the file bytes, so
    re-saving the same weights or moving the folder keeps the digest). Used by
    the run guard (:mod:`mgf_sb.recipe`) as the upstream's identity.

    Returns
    -------
    str
        ``sha256:<first 16 hex digits>``.
    """
    h = hashlib.sha256()
    for name in (FEATURES_FILE, ENCODER_FILE):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot load {path}: {e}. Re-export or re-copy the folder.") from e
        h.update(name.encode())
        for key in sorted(state):
            value = state[key]
            h.update(key.encode())
            if torch.is_tensor(value):
                t = value.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            else:
                h.update(repr(value).encode())
    return "sha256:" + h.hexdigest()[:16]


def build_from_config(config):
    """Fresh (random-weight) FeatureExtractor and MGFEncoder from a config dict."""
    return FeatureExtractor(**config["features"]), MGFEncoder(**config["encoder"])


def load_pretrained(folder, map_location="cpu"):
    """Rebuilds the front end and encoder from a pretrained folder.

    Returns
    -------
    features : FeatureExtractor
        With the saved normalisation statistics (frozen: eval mode).
    encoder : MGFEncoder
    config : dict
        The parsed ``mgf_config.json``.
    """
    config = read_config(folder)
    features, encoder = build_from_config(config)
    for module, name in ((features, FEATURES_FILE), (encoder, ENCODER_FILE)):
        path = os.path.join(folder, name)
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # truncated or foreign file
            raise ValueError(f"cannot load {path}: {e}. Re-export or re-copy the folder.") from e
        check_finite(state, path)
        module.load_state_dict(state)
    features.eval()
    return features, encoder, config
