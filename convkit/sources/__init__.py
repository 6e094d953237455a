"""Inputs: every file or folder convkit reads, opened lazily.

:func:`open_source` gives the logical-weights view (:mod:`convkit.sources.view`) that every
command reads through; :func:`open_raw` gives the stored form (inspect shows both).
"""
from __future__ import annotations

from .base import TensorInfo, TensorSource
from .files import open_file
from .open import open_raw, open_source
from .view import WeightsView, plain_metadata

__all__ = ["TensorInfo", "TensorSource", "WeightsView", "open_source", "open_raw", "open_file",
           "plain_metadata"]
