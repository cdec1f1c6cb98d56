"""The opening every recipe's ``main`` shares (SpeechBrain's usual prologue)."""

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml


def start_experiment(argv):
    """Command line -> hyperparameters, with the experiment folder created.

    Parses ``hparams.yaml --overrides`` with SpeechBrain, joins the DDP group
    when launched by torchrun (a no-op for a plain single-process run), loads
    the YAML, applies ``num_threads`` (torch's CPU threads; one job using all
    cores is fastest, oversubscribed jobs run many times slower) and creates
    ``output_folder`` with a copy of the YAML and the overrides.

    Returns
    -------
    hparams : dict
    run_opts : dict
        SpeechBrain's run options (device, precision, distributed backend...).
    """
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    sb.utils.distributed.ddp_init_group(run_opts)
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    if hparams.get("num_threads"):
        torch.set_num_threads(int(hparams["num_threads"]))
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides
    )
    return hparams, run_opts
