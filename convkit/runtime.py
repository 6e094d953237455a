"""Process-wide settings for streaming work, applied by the CLI before torch is imported.

OpenMP's default wait policy keeps idle worker threads spinning after every torch operation;
on a 2-core machine that spin takes the core the reader and writer threads need, and a
streaming conversion slows down although it does little arithmetic. PASSIVE lets idle OpenMP
threads sleep. It only takes effect if set before torch is first imported, and it is only a
default: a value in the environment wins.
"""
from __future__ import annotations

import os


def prefer_io_friendly_threads() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cache_root():
    """Where convkit keeps what it can rebuild (tokenizer folders, reference renders):
    ``$CONVKIT_CACHE``, else ``$XDG_CACHE_HOME/convkit`` (``~/.cache/convkit``)."""
    from pathlib import Path

    base = os.environ.get("CONVKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "convkit")
    return Path(base)


def quiet_third_party_logs() -> None:
    """Import-time chatter of optional backends (bitsandbytes, transformers) is not ours to show."""
    import logging

    # optional backends log missing GPU extensions and deprecations when something imports
    # them (diffusers imports every installed quantization library)
    for name in ("bitsandbytes", "torchao", "torch.utils._pytree", "optimum.quanto"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
