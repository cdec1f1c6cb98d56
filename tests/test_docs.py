"""The way in (issue 29): a README that fits a first hour, every other page in docs/ linked once,
links that resolve, and no hand-written timing figure in the recipe READMEs (they come from
benchmarks/recipe_times.py)."""

import glob
import os
import re

import pytest

from conftest import REPO


def _read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def test_readme_fits_a_first_hour():
    text = _read("README.md")
    lines = text.splitlines()
    assert len(lines) <= 160, len(lines)
    first_screen = "\n".join(lines[:45])
    assert "## What the benchmark shows today" in first_screen
    assert "benchmarks/RESULTS.md" in text.split("## What the benchmark shows today")[1].split("\n## ")[0]
    quick = text.split("## Quick start")[1].split("\n## ")[0]
    for command in ("pip install -e .", "python recipes/pretrain/train.py hparams/mgf.yaml",
                    "python recipes/TIMIT/train.py hparams/timit.yaml --upstream=results/mgf/1986/pretrained",
                    "python -m pytest -q tests"):
        assert command in quick, command
    assert "results/mgf/1986/" in quick and "finished:" in quick


def test_every_docs_page_is_linked_once_from_the_readme():
    text = _read("README.md")
    pages = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
    assert pages
    for page in pages:
        assert len(re.findall(r"\]\(" + re.escape(page) + r"(#[^)]*)?\)", text)) == 1, page


@pytest.mark.parametrize("path", ["README.md"] + [os.path.relpath(p, REPO) for p in
                                                  glob.glob(os.path.join(REPO, "docs", "*.md"))
                                                  + glob.glob(os.path.join(REPO, "recipes", "*", "README.md"))])
def test_relative_links_resolve(path):
    text = _read(path)
    base = os.path.dirname(os.path.join(REPO, path))
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert os.path.exists(os.path.join(base, target)), (path, target)


@pytest.mark.parametrize("recipe", ["pretrain", "TIMIT", "VoxCeleb", "IEMOCAP", "LibriSpeech"])
def test_recipe_readme_times_come_from_the_script(recipe):
    text = _read(os.path.join("recipes", recipe, "README.md"))
    name = recipe.lower()
    block = re.search(rf"<!-- recipe_times:{name} -->(.*?)<!-- /recipe_times:{name} -->", text, re.S)
    assert block, f"recipes/{recipe}/README.md has no recipe_times block"
    rest = text.replace(block.group(0), "")
    # no other measured CPU time or wall-clock figure by hand
    assert not re.search(r"\d+ CPU-seconds|\d+ (min|minutes|s) wall", rest), recipe


def test_recipe_times_replaces_only_its_block():
    import sys

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from recipe_times import replace_block

    text = "a\n  <!-- recipe_times:timit -->\n  old\n  <!-- /recipe_times:timit -->\nb\n"
    assert replace_block(text, "timit", "new") == \
        "a\n  <!-- recipe_times:timit -->\n  new\n  <!-- /recipe_times:timit -->\nb\n"
    with pytest.raises(ValueError):
        replace_block("no block", "timit", "x")
