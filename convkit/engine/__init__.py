"""Plan, then stream: the one engine every command runs on.

:mod:`.plan` (what to write), :mod:`.ops` (how values become bytes), :mod:`.sinks` (output
files) and :mod:`.execute` (the executor that owns threads, buffers and positional writes).
"""
from .executor import RunStats, execute
from .plan import Item, Out, OutFile, OutFolder, Plan, Src

__all__ = ["Plan", "Item", "Out", "OutFile", "OutFolder", "Src", "execute", "RunStats"]
