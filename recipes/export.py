#!/usr/bin/env python3
"""Export a trained folder to a model folder loadable with ``speechbrain.inference``.

    python recipes/export.py results/mgf/1986 models/mgf            # pretraining output
    python recipes/export.py results/IEMOCAP/<run> models/mgf_emotion  # downstream classifier

Same as ``python -m mgf_sb.export``; see mgf_sb/export.py for the options.
"""

import sys

from mgf_sb.export import main

if __name__ == "__main__":
    sys.exit(main())
