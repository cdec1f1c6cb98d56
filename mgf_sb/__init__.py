"""mgf-sb: MGF multi-granularity self-supervised speech representations for SpeechBrain."""

import logging

__version__ = "0.1.0"


class _DropTorchvisionNotice(logging.Filter):
    """SpeechBrain's train_logger warns "torchvision is not available - cannot save figures" when
    it is imported (every run: the YAML's FileTrainLogger imports it). No recipe here saves
    figures through it, so the line is noise; only that line is dropped."""

    def filter(self, record):
        return not record.getMessage().startswith("torchvision is not available")


logging.getLogger("speechbrain.utils.train_logger").addFilter(_DropTorchvisionNotice())
