"""CRC32 of byte ranges of a file, read by a helper thread into two reusable buffers."""
from __future__ import annotations

import os
import queue
import threading
import zlib

_MB = 1 << 20


def crc_ranges(path, ranges: list[tuple[int, int]], block: int = 16 * _MB) -> list[int]:
    """CRC32 of each (offset, size) range of ``path``: a reader thread fills two reusable
    buffers while the calling thread checksums (zlib releases the GIL), so RSS stays small."""
    fd = os.open(path, os.O_RDONLY)
    bufs = [bytearray(block), bytearray(block)]
    free: queue.Queue = queue.Queue()
    for b in bufs:
        free.put(b)
    full: queue.Queue = queue.Queue()
    stop = threading.Event()

    def run():
        try:
            for i, (off, size) in enumerate(ranges):
                pos = 0
                while pos < size:
                    n = min(block, size - pos)
                    b = free.get()
                    if stop.is_set():
                        return
                    mv = memoryview(b)[:n]
                    got = 0
                    while got < n:
                        r = os.preadv(fd, [mv[got:]], off + pos + got)
                        if r <= 0:
                            raise OSError(f"{path}: file ended early")
                        got += r
                    full.put((i, b, n))
                    pos += n
            full.put(None)
        except BaseException as e:
            full.put(e)

    th = threading.Thread(target=run, name="convkit-verify-reader", daemon=True)
    th.start()
    crcs = [0] * len(ranges)
    try:
        while True:
            got = full.get()
            if got is None:
                break
            if isinstance(got, BaseException):
                raise got
            i, b, n = got
            crcs[i] = zlib.crc32(memoryview(b)[:n], crcs[i])
            free.put(b)
    finally:
        stop.set()
        free.put(bufs[0])
        th.join()
        os.close(fd)
    return crcs
