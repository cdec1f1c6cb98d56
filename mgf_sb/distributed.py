"""DDP helpers on top of SpeechBrain's own (torchrun + ``ddp_init_group``).

SpeechBrain converts every BatchNorm to SyncBatchNorm when it wraps modules in
DDP; SyncBatchNorm exists only on GPUs, so CPU runs with the gloo backend (tests,
laptops) would fail. :class:`CPUFriendlyDDP` keeps plain BatchNorm there.
"""

import contextlib

import torch


@contextlib.contextmanager
def _no_sync_batchnorm():
    original = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    torch.nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(lambda cls, module, process_group=None: module)
    try:
        yield
    finally:
        torch.nn.SyncBatchNorm.convert_sync_batchnorm = original


class CPUFriendlyDDP:
    """Brain mixin: DDP on CPU (gloo) without the SyncBatchNorm conversion."""

    def _wrap_distributed(self):
        if getattr(self, "distributed_launch", False) and torch.device(self.device).type == "cpu":
            with _no_sync_batchnorm():
                return super()._wrap_distributed()
        return super()._wrap_distributed()


def world_size():
    """Number of DDP processes (1 without DDP)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1
