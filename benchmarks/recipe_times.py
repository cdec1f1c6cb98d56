#!/usr/bin/env python3
"""Time of each recipe's bundled-sample command, re-measured: the figures the READMEs quote.

    python benchmarks/recipe_times.py [--recipes pretrain timit voxceleb iemocap librispeech]
        [--work /tmp/mgf_recipe_times] [--write] [--set key=value ...]

Runs each recipe's first command, as its README gives it (the bundled sample; downstream recipes
on their default ``fbank`` upstream and first head), in a fresh output folder under ``--work``, one
after the other, as a subprocess. For each it measures the wall-clock seconds and the CPU seconds
(user + sys of the recipe's processes), counts the epochs in ``train_log.txt`` and reads the sample
result (a sample number that shows the pipeline runs, not a result on the real corpus). It prints
a markdown table with the machine (CPU model, cores, load average at the start), the date and the
package versions, and writes it to ``<work>/recipe_times.md``.

``--write`` also puts each recipe's line into its README between the markers
``<!-- recipe_times:<name> -->`` and ``<!-- /recipe_times:<name> -->``, keeps the measurement in
``benchmarks/recipe_times.json`` and writes the table of every recipe's last one to
``benchmarks/recipe_times.md``: the figures in the READMEs are then this script's, with the
machine they were measured on, and rerunning it replaces them. ``--set key=value`` adds an
override to every command (the tests run ``--recipes timit --set number_of_epochs=1``).

On a shared machine the wall-clock time follows the machine's load more than the recipe; the CPU
seconds are the steadier figure (torch's threads can spin on contended cores, inflating both).
"""

import argparse
import datetime
import glob
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (README, script, YAML, output-folder override key, extra overrides)
RECIPES = {
    "pretrain": ("recipes/pretrain/README.md", "recipes/pretrain/train.py", "hparams/mgf.yaml", "output_folder", {}),
    "timit": ("recipes/TIMIT/README.md", "recipes/TIMIT/train.py", "hparams/timit.yaml", "output_folder", {}),
    "voxceleb": ("recipes/VoxCeleb/README.md", "recipes/VoxCeleb/train.py", "hparams/voxceleb.yaml",
                 "output_folder", {}),
    "iemocap": ("recipes/IEMOCAP/README.md", "recipes/IEMOCAP/train.py", "hparams/emotion.yaml",
                "experiment_folder", {}),
    "librispeech": ("recipes/LibriSpeech/README.md", "recipes/LibriSpeech/train.py", "hparams/librispeech_ctc.yaml",
                    "output_folder", {}),
}


def machine():
    """One line: CPU model, cores, OS, Python, torch, and whether a GPU was used (never: CPU only)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            model = names[0]
    except OSError:
        pass
    try:
        import torch

        tv = torch.__version__
    except ImportError:
        tv = "?"
    return (f"{os.cpu_count()}-core {platform.machine()} ({model}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {tv}, CPU only"
            + (f", OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" if os.environ.get("OMP_NUM_THREADS") else ""))


def _epochs(folder):
    logs = glob.glob(os.path.join(folder, "**", "train_log.txt"), recursive=True)
    if not logs:
        return 0
    with open(logs[0], encoding="utf-8") as f:
        return sum(1 for line in f if line.startswith("epoch: "))


def _json(folder, name):
    found = sorted(glob.glob(os.path.join(folder, "**", name), recursive=True))
    if not found:
        return None
    with open(found[0], encoding="utf-8") as f:
        return json.load(f)


def _finished(folder):
    rec = _json(folder, "finished.json") or {}
    return "early-stopped" if rec.get("stopped") == "early" else "epoch limit"


def sample_result(name, folder):
    """The run's sample result in a few words (a sample number, not a result on the corpus)."""
    if name == "pretrain":
        logs = glob.glob(os.path.join(folder, "train_log.txt"))
        if not logs:
            return "-"
        last = open(logs[0], encoding="utf-8").read().splitlines()[-1]
        m = re.search(r"valid loss: ([-\d.e+]+)", last)
        return f"last valid loss {float(m.group(1)):.3f}" if m else "-"
    if name == "timit":
        r = _json(folder, "results.json")
        return (f"frame accuracy dev {100 * r['dev']['acc']:.1f} %, test {100 * r['test']['acc']:.1f} % "
                f"(majority class {100 * r['test']['majority_frequency']:.1f} %)") if r else "-"
    if name == "voxceleb":
        r = _json(folder, "results.json")
        if not r:
            return "-"
        s = f"SID accuracy {100 * r['sid_test_acc']:.1f} % (chance {100 * r['chance_acc']:.1f} %"
        if r.get("convex_reference") is not None:
            s += f", convex reference {100 * r['convex_reference']:.1f} %"
        s += ")"
        if r.get("eer") is not None:
            s += f", EER {100 * r['eer']:.1f} % on {r.get('n_trials')} trials"
        return s
    if name == "iemocap":
        r = _json(folder, "test_results.json")
        if not r:
            return "-"
        s = f"UA {100 * r['UA']:.1f} %, WA {100 * r['WA']:.1f} % on {r.get('n_utterances')} test utterances"
        if r.get("convex_reference") is not None:
            s += f" (convex reference UA {100 * r['convex_reference']:.1f} %)"
        return s
    if name == "librispeech":
        r = _json(folder, "results.json")
        if not r:
            return "-"
        return ", ".join(f"{s} greedy WER {v['greedy_WER']:.1f} %" for s, v in r["splits"].items())
    return "-"


def run_one(name, work, extra):
    readme, script, yaml, out_key, overrides = RECIPES[name]
    folder = os.path.join(work, name)
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, script, yaml, f"--{out_key}={folder}"] + [f"--{k}={v}" for k, v in
                                                                      {**overrides, **extra}.items()]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    n = _epochs(folder)
    command = " ".join(["python", script, yaml] + [f"--{k}={v}" for k, v in extra.items()])
    return {"name": name, "readme": readme, "command": command, "wall_s": wall, "cpu_s": cpu, "epochs": n,
            "ended": _finished(folder), "result": sample_result(name, folder)}


def fmt_seconds(s):
    return f"{s:.1f} s" if s < 90 else f"{int(s // 60)} min {int(round(s % 60))} s"


def line(row, where):
    return (f"Measured by `python benchmarks/recipe_times.py --write` ({where}): `{row['command']}` took "
            f"**{fmt_seconds(row['wall_s'])} wall-clock, {row['cpu_s']:.1f} CPU-seconds** (user + sys), "
            f"{row['epochs']} epochs ({row['ended']}); sample result (not a corpus result): {row['result']}.")


def table(rows, where):
    out = [f"# Recipe times on the bundled samples\n",
           f"Written by `python benchmarks/recipe_times.py --write`; {where}. Each recipe's README quotes its line.\n",
           "| recipe | command | wall-clock | CPU-seconds | epochs | sample result (not a corpus result) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | `{r['command']}` | {fmt_seconds(r['wall_s'])} | {r['cpu_s']:.1f} | "
                   f"{r['epochs']} ({r['ended']}) | {r['result']} |")
    return "\n".join(out) + "\n"


def replace_block(text, name, body):
    """``text`` with the lines between ``<!-- recipe_times:name -->`` and ``<!-- /recipe_times:name -->``
    replaced by ``body``; a ValueError when the markers are missing."""
    begin, end = f"<!-- recipe_times:{name} -->", f"<!-- /recipe_times:{name} -->"
    pattern = re.compile(r"([ \t]*)" + re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {begin} ... {end} block")
    return pattern.sub(lambda m: f"{m.group(1)}{begin}\n{m.group(1)}{body}\n{m.group(1)}{end}", text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--work", default="/tmp/mgf_recipe_times")
    p.add_argument("--write", action="store_true", help="update the READMEs' blocks and benchmarks/recipe_times.md")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="an override for every command")
    args = p.parse_args(argv)
    extra = dict(s.split("=", 1) for s in args.set)
    os.makedirs(args.work, exist_ok=True)
    load = os.getloadavg()[0]
    where = (f"{machine()}; {datetime.date.today().isoformat()}, load average {load:.1f} at the start "
             f"(the machine may be shared: CPU-seconds are the steadier figure)")
    rows = []
    for name in args.recipes:
        print(f"[recipe_times] {name} ...", flush=True)
        rows.append(run_one(name, args.work, extra))
        print(f"[recipe_times] {name}: {fmt_seconds(rows[-1]['wall_s'])} wall, {rows[-1]['cpu_s']:.1f} CPU-s, "
              f"{rows[-1]['epochs']} epochs", flush=True)
    md = table(rows, where)
    print("\n" + md)
    with open(os.path.join(args.work, "recipe_times.md"), "w", encoding="utf-8") as f:
        f.write(md)
    if args.write:
        for r in rows:
            path = os.path.join(REPO, r["readme"])
            with open(path, encoding="utf-8") as f:
                text = f.read()
            with open(path, "w", encoding="utf-8") as f:
                f.write(replace_block(text, r["name"], line(r, where)))
        # benchmarks/recipe_times.json keeps every recipe's last measurement; the table shows them all
        store = os.path.join(REPO, "benchmarks", "recipe_times.json")
        try:
            with open(store, encoding="utf-8") as f:
                kept = {r["name"]: r for r in json.load(f)["rows"]}
        except (OSError, ValueError, KeyError):
            kept = {}
        kept.update({r["name"]: dict(r, where=where) for r in rows})
        ordered = [kept[n] for n in RECIPES if n in kept]
        with open(store, "w", encoding="utf-8") as f:
            json.dump({"rows": ordered}, f, indent=2)
        wheres = sorted({r["where"] for r in ordered})
        with open(os.path.join(REPO, "benchmarks", "recipe_times.md"), "w", encoding="utf-8") as f:
            f.write(table(ordered, "; ".join(wheres)))
    return rows


if __name__ == "__main__":
    main()
