#!/usr/bin/env python3
"""VoxCeleb1 verification only: EER and minDCF of the trial list.

    python recipes/VoxCeleb/verify.py hparams/voxceleb.yaml [same overrides as train.py]

Loads the best checkpoint of ``train.py`` in the same ``output_folder`` (the
upstream's normaliser statistics, learned layer weights and head) and scores
every trial of ``trial_file`` with the cosine similarity of the two
utterances' embeddings: the standardised pooled statistics with
``--head=linear``, the x-vector with ``--head=xvector`` (give the same
``--head`` as to train.py; it is part of the output folder). With a pretrained
upstream it also runs without a checkpoint (uniform layer weights, untrained
standardisation). Results: ``<output_folder>/verification.json``, scores in
``veri_scores.txt``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:], mode="verify")
