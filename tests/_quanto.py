"""optimum-quanto compiles its C++ extension (int4/int2 unpacking) on first use, into its own
package folder. Two test workers doing that at once in a fresh venv have loaded a half-built
module (CI: "module 'quanto_cpp' has no attribute 'unpack'"); here one process at a time builds
or loads it, under a file lock beside the build folder."""
from __future__ import annotations

import os


def one_build_at_a_time() -> None:
    from filelock import FileLock
    from optimum.quanto.library.extensions import extension

    cls = extension.Extension
    if getattr(cls, "_convkit_locked", False):
        return
    unlocked = cls.lib.fget

    def lib(self):
        if self._lib is None:
            lock = os.path.join(os.path.dirname(self.build_directory), ".build.lock")
            with FileLock(lock):
                return unlocked(self)
        return self._lib

    cls.lib = property(lib)
    cls._convkit_locked = True
