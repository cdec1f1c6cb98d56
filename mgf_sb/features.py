"""Front end: SpeechBrain's Fbank + global InputNormalization (+ frame stacking).

Global (corpus) statistics, not per-utterance CMVN: per-utterance
normalisation erases the level and spectral offsets that speaker and emotion
probes rely on.
"""

import torch
from speechbrain.lobes.features import Fbank
from speechbrain.processing.features import InputNormalization

from mgf_sb.batch import encoder_frame_centres, n_encoder_frames


class FeatureExtractor(torch.nn.Module):
    """Waveforms -> normalised (stacked) log-Mel frames.

    Arguments
    ---------
    sample_rate : int
    n_mels : int
    win_length_ms, hop_length_ms : float
    frame_stack : int
        Consecutive fbank frames concatenated per encoder frame (2 halves the
        encoder's frame rate and roughly halves its cost).
    update_until_epoch : int
        The global statistics are accumulated during training until this epoch.
    update_until_step : int, optional
        Instead: they are accumulated over the first ``update_until_step``
        training batches, then frozen (the targets of the frame scale stop
        drifting after a known number of steps, however long an epoch is).
        None: ``update_until_epoch`` decides.

    Example
    -------
    >>> fe = FeatureExtractor(n_mels=40, frame_stack=2)
    >>> feats, n = fe(torch.randn(2, 16000), torch.tensor([1.0, 0.5]))
    >>> feats.shape, n.tolist()
    (torch.Size([2, 51, 80]), [51, 26])
    """

    def __init__(
        self,
        sample_rate=16000,
        n_mels=80,
        win_length_ms=25.0,
        hop_length_ms=10.0,
        frame_stack=1,
        update_until_epoch=2,
        update_until_step=None,
    ):
        super().__init__()
        self.config = dict(
            sample_rate=sample_rate,
            n_mels=n_mels,
            win_length_ms=win_length_ms,
            hop_length_ms=hop_length_ms,
            frame_stack=frame_stack,
            update_until_epoch=update_until_epoch,
            update_until_step=update_until_step,
        )
        self.fbank = Fbank(
            sample_rate=sample_rate,
            n_mels=n_mels,
            win_length=win_length_ms,
            hop_length=hop_length_ms,
            n_fft=int(2 ** torch.ceil(torch.log2(torch.tensor(sample_rate * win_length_ms / 1000.0)))),
        )
        if update_until_step is not None and int(update_until_step) < 1:
            raise ValueError(f"normalizer_update_steps must be >= 1 or null, got {update_until_step}")
        self.update_until_step = None if update_until_step is None else int(update_until_step)
        self.normalizer = InputNormalization(norm_type="global", update_until_epoch=update_until_epoch)
        self.updates = 0  # training batches that updated the statistics (saved with them)
        self.hop = int(round(sample_rate * hop_length_ms / 1000.0))
        self.frame_stack = frame_stack
        self.sample_rate = sample_rate

    @property
    def output_size(self):
        """Feature dimension per encoder frame."""
        return self.config["n_mels"] * self.frame_stack

    @property
    def frame_rate(self):
        """Encoder frames per second."""
        return self.sample_rate / self.hop / self.frame_stack

    def n_frames(self, wavs, wav_lens):
        """(B,) valid encoder frames for padded ``wavs`` (B, samples)."""
        n_samples = torch.round(wav_lens.float() * wavs.shape[1]).long()
        return n_encoder_frames(n_samples, self.hop, self.frame_stack)

    def frame_centres(self, n_samples):
        """Sample position of each encoder frame's centre in a waveform of ``n_samples``.

        (:func:`~mgf_sb.batch.encoder_frame_centres`.) Frame-level labels (TIMIT) are read at
        these positions, so they follow any frame rate.

        >>> FeatureExtractor(frame_stack=2).frame_centres(800).tolist()
        [80.0, 400.0, 720.0]
        """
        return encoder_frame_centres(n_samples, self.hop, self.frame_stack)

    def forward(self, wavs, wav_lens, epoch=None, channel=None):
        """Computes features.

        Arguments
        ---------
        wavs : torch.Tensor
            (B, samples) zero-padded 16 kHz waveforms.
        wav_lens : torch.Tensor
            (B,) relative lengths.
        epoch : int, optional
            Current epoch (statistics stop updating after ``update_until_epoch``).
        channel : callable, optional
            ``channel(log_mel, n_fbank_frames) -> log_mel`` on the *unnormalised* (B, Tf, n_mels)
            log-Mel rows before normalisation (each row its own random channel: pretraining's
            ``view_channel``, :func:`mgf_sb.pretraining.view_channel_fn`). None: none (inference,
            validation, the default).

        Returns
        -------
        feats : torch.Tensor
            (B, T, n_mels * frame_stack) normalised features, zero on padding.
        n_frames : torch.LongTensor
            (B,) valid frames.
        """
        # Always float32: STFT and log under fp16/bf16 autocast lose the low-energy detail.
        with torch.no_grad(), torch.autocast(device_type=wavs.device.type, enabled=False):
            fb = self.fbank(wavs.float())  # (B, Tf, n_mels)
            Tf = fb.shape[1]
            n_samples = torch.round(wav_lens.float() * wavs.shape[1]).long()
            n_fb = (n_samples // self.hop + 1).clamp(max=Tf)
            if channel is not None:  # before the statistics: they are those of the features the encoder sees
                fb = channel(fb, n_fb)
            nrm = self.normalizer
            if self.update_until_step is not None:
                # past the budget of batches, an epoch beyond update_until_epoch tells it to stop
                epoch = 0 if self.updates < self.update_until_step else float("inf")
            if self.training and nrm._should_update(epoch):
                self.updates += 1
            if nrm.count > 0:  # its statistics are plain attributes, not buffers
                nrm.glob_mean = nrm.glob_mean.to(fb.device)
                nrm.glob_std = nrm.glob_std.to(fb.device)
            elif not (self.training and nrm._should_update(epoch)):
                raise RuntimeError(
                    "FeatureExtractor has no normalisation statistics yet: run it in "
                    "training mode first, or load a pretrained folder"
                )
            # Relative lengths half a frame short: SpeechBrain's mask keeps frames t < len * Tf - eps, and
            # n_fb / Tf * Tf can round to n_fb + 1e-6, which counted one padding frame in the statistics.
            # Under DDP SpeechBrain all-reduces the statistics (mean_std_update), so every process
            # holds those of the global batch (tests/ddp_exact_check.py).
            fb = nrm(fb, (n_fb.float() - 0.5) / Tf, epoch=epoch)
            valid = torch.arange(Tf, device=fb.device)[None, :] < n_fb[:, None]
            fb = fb * valid[..., None]
            k = self.frame_stack
            if k > 1:
                pad = (-Tf) % k
                fb = torch.nn.functional.pad(fb, (0, 0, 0, pad))
                fb = fb.reshape(fb.shape[0], -1, k * fb.shape[2])
            n_frames = (n_fb + k - 1) // k
        return fb, n_frames

    def normalizer_state(self):
        """The global statistics as a plain dict of tensors (for saving)."""
        n = self.normalizer
        if n.count == 0:
            return {"glob_mean": torch.zeros(0), "glob_std": torch.zeros(0), "count": torch.tensor(0),
                    "updates": torch.tensor(0)}
        return {
            "glob_mean": torch.as_tensor(n.glob_mean).detach().cpu(),
            "glob_std": torch.as_tensor(n.glob_std).detach().cpu(),
            "count": torch.as_tensor(n.count),
            "updates": torch.tensor(int(self.updates)),
        }

    # The statistics travel inside state_dict(), so SpeechBrain's Checkpointer
    # and the pretrained-folder format both keep them with the weights.
    def get_extra_state(self):
        return self.normalizer_state()

    def set_extra_state(self, state):
        self.load_normalizer_state(state)

    def load_normalizer_state(self, state):
        """Restores statistics saved by :meth:`normalizer_state`."""
        n = self.normalizer
        n.glob_mean = state["glob_mean"].float()
        n.glob_std = state["glob_std"].float()
        n.count = int(state["count"])
        self.updates = int(state.get("updates", 0))  # absent from folders saved before normalizer_update_steps
