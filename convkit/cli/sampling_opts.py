"""``--prediction`` and ``--sampler``: the sampling facts a command records in the model it
writes (:mod:`convkit.sampling`), shared by every command that writes a model."""
from __future__ import annotations

import click


def _check(kind):
    def callback(ctx, param, value):
        from .. import sampling

        # an unknown name is a ConvkitError (exit 2, nearest name suggested), reported as one
        # line by ConvkitGroup before anything is read
        fn = sampling.check_prediction if kind == "prediction" else sampling.check_sampler
        return fn(value, f"--{kind}")
    return callback


def sampling_options(f):
    f = click.option("--sampler", default=None, metavar="NAME", callback=_check("sampler"),
                     help="Record the sampler the model is meant for (euler-trailing, euler, "
                          "lcm, flow-euler; e.g. lcm for an LCM-LoRA merge) in the output's "
                          "metadata (convkit.sampler; a diffusers folder's scheduler too). "
                          "Later commands carry it; verify renders with it. Default: the "
                          "input's.")(f)
    f = click.option("--prediction", default=None, metavar="TYPE",
                     callback=_check("prediction"),
                     help="Record the prediction type (epsilon, v_prediction, sample; sample = "
                          "x0, the 1-step Lightning model) in the output's metadata "
                          "(convkit.prediction; a diffusers folder's scheduler_config.json "
                          "prediction_type too). Later commands carry it; verify renders with "
                          "it. Default: the input's.")(f)
    return f


def stated(prediction, sampler):
    from .. import sampling

    return sampling.stated(prediction=prediction, sampler=sampler)
