"""Features for your own audio files: one ``.npy`` per file.

    python -m mgf_sb.extract <model folder> <wav folder | list file | audio file> <out folder>
        [--layer=N] [--format=npy|pt] [--device=cpu|cuda] [--chunk_seconds=30] [--overwrite]

``<model folder>`` is an exported encoder (``python -m mgf_sb.export <run> <model folder>``),
loaded with :class:`mgf_sb.inference.MGFEncoder`: local only, nothing is downloaded.
The input is a folder (searched recursively for .wav/.flac/.ogg), a text file with one audio
path per line (relative paths are relative to the list file), or one audio file. Every file
is read as :meth:`MGFEncoder.encode_file` reads it (any rate and channel count; long files in
overlapping chunks) and written to ``<out>/<path relative to the input>.npy``: an array
``(num_layers, T, D)`` (all layers: 0 = input embedding) or ``(T, D)`` with ``--layer``, with
``T`` frames at ``frame_rate`` Hz (frame ``t`` covers ``[t, t + 1) / frame_rate`` seconds).

A file the model cannot read (missing, empty, unreadable, NaN/Inf samples, too short) is
skipped with the reason the inference check gives (:func:`mgf_sb.inference.read_audio_file`,
the check ``encode_file`` uses) and listed in ``<out>/extract_skipped.tsv``; the others are
encoded. ``<out>/extract_info.json`` records the model, layer, format, chunking, frame rate and
every file in the folder. A rerun with the same settings keeps the outputs that exist and encodes
only the new files; a rerun that changes a setting (another ``--layer``, model, format or chunking)
is refused before anything is written, naming each change, since the folder would then mix two
kinds of arrays: give another output folder, or ``--overwrite`` to recompute every file.
"""

import argparse
import json
import logging
import os
import sys

import numpy as np
import torch

from mgf_sb.data.audio import scan_audio
from mgf_sb.data.manifest import SkipReport

logger = logging.getLogger(__name__)

EXTENSIONS = (".wav", ".flac", ".ogg")
LIST_SUFFIXES = (".txt", ".lst", ".list", ".scp")
INFO_FILE = "extract_info.json"
# What the arrays in an output folder depend on: a rerun must give the same values.
SETTINGS = ("model", "layer", "format", "chunk_seconds", "overlap_seconds")


class ExtractSettingsChanged(ValueError):
    """A rerun into an output folder whose arrays were made with other settings."""


def read_info(out):
    """``<out>/extract_info.json`` of an earlier run, or None."""
    try:
        with open(os.path.join(out, INFO_FILE), encoding="utf-8") as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def check_settings(out, settings, overwrite=False):
    """Refuses (:class:`ExtractSettingsChanged`) a rerun into ``out`` with other ``settings`` than
    the arrays there were made with, unless ``overwrite`` (then every file is recomputed)."""
    old = read_info(out)
    if old is None or overwrite:
        return
    changed = {k: (old.get(k, "<absent>"), settings[k]) for k in SETTINGS
               if k in old and old.get(k) != settings[k]}
    if changed:
        lines = "\n".join(f"  {k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changed.items())
        raise ExtractSettingsChanged(
            f"{out} holds features extracted with other settings (old -> new):\n{lines}\n"
            f"Nothing was written. Give another output folder, or --overwrite to recompute every file there.")


def list_inputs(source):
    """A folder, a list file or one audio file -> (sorted audio paths, root they are relative to)."""
    source = os.path.expanduser(str(source))
    if os.path.isdir(source):
        return scan_audio(source, extensions=EXTENSIONS), source
    if not os.path.isfile(source):
        raise FileNotFoundError(f"input {source!r} does not exist (give a folder, a list file or an audio file)")
    if source.lower().endswith(EXTENSIONS):
        return [source], os.path.dirname(os.path.abspath(source))
    if not source.lower().endswith(LIST_SUFFIXES):
        raise ValueError(f"input {source!r}: not a folder, an audio file ({', '.join(EXTENSIONS)}) or a list "
                         f"file ({', '.join(LIST_SUFFIXES)}, one path per line)")
    base = os.path.dirname(os.path.abspath(source))
    with open(source, encoding="utf-8") as f:
        paths = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in paths]
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else base
    return paths, root


def output_names(paths, root, suffix):
    """One output name per input, relative to ``root``, extension replaced by ``suffix``
    (kept before it when two inputs would collide: ``a.wav`` and ``a.flac``)."""
    rel = [os.path.relpath(os.path.abspath(p), os.path.abspath(root)) for p in paths]
    stems = [os.path.splitext(r)[0] for r in rel]
    dup = {s for s in stems if stems.count(s) > 1}
    return [(r if s in dup else s) + suffix for r, s in zip(rel, stems)]


def extract(model, source, out, layer="default", fmt="npy", device="cpu", chunk_seconds=None,
            overlap_seconds=None, overwrite=False, progress=True):
    """Encodes every audio file of ``source`` into ``out`` (see the module docstring).

    Returns
    -------
    dict
        ``written`` (list of (input, output, frames)), ``kept`` (existing outputs), ``skipped``
        (list of (input, reason)), and the model facts (frame_rate, num_layers, layer).
    """
    from tqdm import tqdm

    from mgf_sb.inference import MGFEncoder

    if fmt not in ("npy", "pt"):
        raise ValueError(f"--format must be npy or pt, got {fmt!r}")
    paths, root = list_inputs(source)
    if not paths:
        raise ValueError(f"no audio files ({', '.join(EXTENSIONS)}) found in {source!r}")
    enc = MGFEncoder.from_hparams(source=model, run_opts={"device": device})
    layer = enc._resolve_layer(layer)
    settings = {"model": os.path.abspath(model), "layer": layer, "format": fmt, "chunk_seconds": chunk_seconds,
                "overlap_seconds": overlap_seconds}
    check_settings(out, settings, overwrite)
    earlier = {f["output"]: f for f in (read_info(out) or {}).get("files", []) if isinstance(f, dict)}
    names = output_names(paths, root, "." + fmt)
    report = SkipReport("extract")
    written, kept = [], []
    bar = tqdm(list(zip(paths, names)), desc="extracting", disable=not progress, dynamic_ncols=True)
    for path, name in bar:
        dest = os.path.join(out, name)
        if os.path.exists(dest) and not overwrite:
            kept.append((path, dest))
            continue
        try:
            wav = enc.load_waveform(path)  # the inference check: the reason names the problem
        except (ValueError, FileNotFoundError) as e:
            report.add(path, str(e))
            continue
        feats = enc._encode_waveform(wav, chunk_seconds, overlap_seconds)
        feats = (feats if layer is None else feats[layer]).float().cpu()
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        tmp = dest + ".tmp"
        with open(tmp, "wb") as f:
            np.save(f, feats.numpy()) if fmt == "npy" else torch.save(feats, f)
        os.replace(tmp, dest)
        written.append((path, dest, int(feats.shape[-2])))
    os.makedirs(out, exist_ok=True)
    report.write(out)
    files = dict(earlier)  # every array in the folder: the earlier runs' and this one's
    for p, d in kept:
        files.setdefault(os.path.relpath(d, out), {"input": p, "output": os.path.relpath(d, out), "frames": None})
    for p, d, n in written:
        files[os.path.relpath(d, out)] = {"input": p, "output": os.path.relpath(d, out), "frames": n}
    info = {**settings, "source": os.path.abspath(source),
            "num_layers": int(enc.num_layers), "frame_rate": float(enc.frame_rate),
            "shape": "(num_layers, T, D)" if layer is None else "(T, D)",
            "files": [files[k] for k in sorted(files)],
            "written": len(written), "kept": len(kept), "skipped": len(report)}
    tmp = os.path.join(out, INFO_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(out, INFO_FILE))
    return dict(info, written=written, kept_files=kept, skipped_files=list(report.items))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m mgf_sb.extract",
        description="Encode audio files with an exported MGF encoder: one .npy (or .pt) per file.")
    parser.add_argument("model", help="exported model folder (python -m mgf_sb.export <run> <model folder>)")
    parser.add_argument("source", help="a folder (searched recursively), a list file (one path per line) "
                        "or one audio file")
    parser.add_argument("out", help="output folder: <out>/<relative path>.npy, extract_skipped.tsv, extract_info.json")
    parser.add_argument("--layer", default="default",
                        help="a layer index (0 = input embedding, -1 = last) or 'all'; default: the model's "
                             "hyperparams.yaml layer (null = all layers)")
    parser.add_argument("--format", default="npy", choices=("npy", "pt"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk_seconds", type=float, default=None)
    parser.add_argument("--overlap_seconds", type=float, default=None)
    parser.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    args = parser.parse_args(argv)
    layer = None if args.layer == "all" else ("default" if args.layer == "default" else int(args.layer))
    try:
        res = extract(args.model, args.source, args.out, layer=layer, fmt=args.format, device=args.device,
                      chunk_seconds=args.chunk_seconds, overlap_seconds=args.overlap_seconds,
                      overwrite=args.overwrite)
    except ExtractSettingsChanged as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(res['written'])} files encoded ({res['shape']} at {res['frame_rate']:g} frames/s) into {args.out}"
          + (f"; {res['kept']} already there" if res["kept"] else "")
          + (f"; {res['skipped']} skipped, listed with the reason in "
             f"{os.path.join(args.out, 'extract_skipped.tsv')}" if res["skipped"] else ""))
    for path, reason in res["skipped_files"][:10]:
        print(f"  skipped {path}: {reason}")
    return 0 if res["written"] or res["kept"] else 1


if __name__ == "__main__":
    sys.exit(main())
