"""The header of a safetensors file, read and checked without torch."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from noisynn.errors import UserError

_SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                       "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_safetensors_header(path: Path, what: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors (name → (dtype, shape)) a safetensors file declares, after checking it is one.

    Reads only the header (no torch): the 8-byte length, the JSON header, and that the tensors'
    byte ranges fill the file exactly, so a truncated file, a pickle or zip renamed
    ``.safetensors``, or an empty file is named here instead of failing inside a loader.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist (expected a .safetensors file).")
    size = path.stat().st_size

    def bad(why: str):
        return UserError(f"{what} {path} is not a readable safetensors file ({why}).")

    if size < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n < 2 or n > min(size - 8, 100 << 20):
            raise bad("the header length is not plausible: a pickle, an archive, or a file cut short")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    tensors, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            count = 1
            for d in shape:
                count *= d
            itemsize = _SAFETENSORS_DTYPES.get(dtype)  # sub-byte and newer dtypes: not size-checked
            if begin < 0 or stop < begin or (itemsize is not None and stop - begin != count * itemsize):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry") from None
        tensors[name] = (dtype, shape)
        end = max(end, stop)
    if 8 + n + end != size:
        raise bad(f"its tensors need {8 + n + end} bytes but the file has {size}: cut short or padded")
    return tensors
