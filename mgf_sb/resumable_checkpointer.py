"""SpeechBrain's Checkpointer, made safe against a kill during a save.

SpeechBrain writes a checkpoint's meta file first and its parameter files
after; a SIGKILL in between leaves the newest ``CKPT+...`` folder incomplete
and the next start would try to load it. This subclass writes a ``COMPLETE``
marker after every file is on disk, and ignores (and renames to
``incomplete-CKPT+...``) any folder without it, so recovery falls back to the
last complete checkpoint.
"""

import logging
import os

from speechbrain.utils.checkpoints import Checkpointer as _SBCheckpointer
from speechbrain.utils.distributed import ddp_barrier, if_main_process

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"


class Checkpointer(_SBCheckpointer):
    """Drop-in replacement for ``speechbrain.utils.checkpoints.Checkpointer``."""

    def save_checkpoint(self, *args, **kwargs):
        ckpt = super().save_checkpoint(*args, **kwargs)
        if ckpt is not None and if_main_process():
            marker = os.path.join(str(ckpt.path), MARKER)
            with open(marker, "w") as f:
                f.write("ok\n")
                f.flush()
                os.fsync(f.fileno())
        # Every DDP process must see the marker before it lists checkpoints
        # again: save_and_keep_only's deletions are collectives (SpeechBrain's
        # main_process_only broadcasts), so the processes must agree on the list.
        ddp_barrier()
        return ckpt

    def _list_checkpoint_dirs(self):
        dirs = super()._list_checkpoint_dirs()
        complete = [d for d in dirs if (d / MARKER).exists()]
        for d in dirs:
            if (d / MARKER).exists():
                continue
            # Only the main process decides (other DDP ranks may look while rank 0 is still writing).
            if if_main_process():
                logger.warning(f"ignoring incomplete checkpoint {d} (interrupted while saving)")
                try:
                    os.replace(d, d.parent / f"incomplete-{d.name}")
                except OSError:
                    pass
        return complete
