"""Reading GGUF key/values with gguf-py's own reader (the tests' independent check)."""
from __future__ import annotations

import gguf


def field(r: gguf.GGUFReader, key: str):
    """A KV's value: str, int/float, a list of ints for arrays; None when absent."""
    f = r.get_field(key)
    if f is None:
        return None
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [int(f.parts[i][0]) for i in f.data]
    return f.parts[f.data[0]].tolist()[0]
