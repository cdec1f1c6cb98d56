"""What every downstream recipe shares: the Brain base, optimisers, notices.

A recipe subclasses :class:`DownstreamBrain`, declares ``upstream``,
``layer_selector`` and its head in YAML, and implements ``compute_forward`` /
``compute_objectives`` / ``on_stage_end`` with ``self.encode(...)``.
"""

import json
import logging
import os

import speechbrain as sb

from mgf_sb.distributed import CPUFriendlyDDP, unwrap

logger = logging.getLogger(__name__)


class DownstreamBrain(CPUFriendlyDDP, sb.Brain):
    """Brain with an upstream (frozen or fine-tuned) and a layer selector.

    Expects ``modules.upstream`` (:class:`~mgf_sb.upstream.Upstream`) and
    ``modules.layer_selector`` (:class:`~mgf_sb.upstream.LayerSelector`); the
    head optimiser comes from ``opt_class``, the fine-tuned upstream's from
    ``hparams.upstream_opt_class`` (only when ``freeze`` is False).
    """

    def compute_forward(self, batch, stage):
        """Upstream -> layer selector -> ``modules.head(feats, n_frames)``.

        What the utterance-level recipes (IEMOCAP, VoxCeleb1) need as is;
        frame-level recipes override it.
        """
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        feats, n_frames = self.encode(wavs, wav_lens, stage)
        return self.modules.head(feats, n_frames)

    def encode(self, wavs, wav_lens, stage):
        """Waveforms -> (B, T, D) features for the head, and (B,) valid frames."""
        layers, n_frames = self.modules.upstream(wavs, wav_lens, update_stats=stage == sb.Stage.TRAIN)
        return self.modules.layer_selector(layers), n_frames

    def init_optimizers(self):
        upstream = unwrap(self.modules.upstream)  # DDP-wrapped when fine-tuned under torchrun
        up_params = {id(p) for p in upstream.parameters()}
        head_params = [p for p in self.modules.parameters() if id(p) not in up_params and p.requires_grad]
        self.optimizer = self.opt_class(head_params)
        self.optimizers_dict = {"model": self.optimizer}
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)
        trainable_up = [p for p in upstream.parameters() if p.requires_grad]
        if not getattr(upstream, "freeze", True) and trainable_up:
            self.upstream_optimizer = self.hparams.upstream_opt_class(trainable_up)
            self.optimizers_dict["upstream"] = self.upstream_optimizer
            if self.checkpointer is not None:
                self.checkpointer.add_recoverable("upstream_optimizer", self.upstream_optimizer)

    def on_evaluate_start(self, max_key=None, min_key=None):
        super().on_evaluate_start(max_key=max_key, min_key=min_key)
        if not unwrap(self.modules.upstream).statistics_ready():
            raise RuntimeError(
                "the upstream has no feature-normalisation statistics: train at least one epoch "
                "(or give a pretrained folder as upstream / upstream_reference) before evaluating"
            )

    def layer_weights(self):
        """The learned layer weights (list) or None for a fixed layer."""
        return self.hparams.layer_selector.normalized_weights()


def announce_data(data_folder, sample_folder_name="samples"):
    """Says loudly when a recipe runs on a bundled sample instead of a real corpus."""
    if sample_folder_name in os.path.normpath(data_folder).split(os.sep):
        msg = (f"USING THE BUNDLED SAMPLE CORPUS at {data_folder} (synthetic speech, a smoke test). "
               f"Pass --data_folder=/path/to/the/real/corpus for real results.")
        logger.warning("=" * 20 + " " + msg + " " + "=" * 20)
        print(msg, flush=True)
        return True
    return False


def write_results(folder, name, results, markdown=None):
    """Writes ``<name>.json`` and, if given, ``<name>.md`` into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    if markdown is not None:
        with open(os.path.join(folder, f"{name}.md"), "w") as f:
            f.write(markdown)
    logger.info(f"results written to {os.path.join(folder, name)}.json")
