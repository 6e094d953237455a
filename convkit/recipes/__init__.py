"""Recipes: declarative, resumable release pipelines (``convkit run``).

A recipe (:mod:`.recipe`) names inputs and artifacts; each artifact is one registered operation
(:mod:`.ops`) with its options and may read other artifacts, so artifacts form a graph. A run
(:mod:`.run`) computes every artifact's content key, skips those its record (:mod:`.state`)
vouches for and builds the rest with an executor (:mod:`.executors`, :mod:`.ray_executor`).
"""
from __future__ import annotations

from ..errors import ConvkitError
from .recipe import Recipe, RecipeError, load, shipped_recipes
from .run import RunResult, run


class RunFailed(ConvkitError, RuntimeError):
    """An artifact failed or a gate failed; the exit code is the run's."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


__all__ = ["Recipe", "RecipeError", "RunFailed", "RunResult", "load", "run", "shipped_recipes"]
