"""A small pure-Python TFRecord reader, so tfrecord TFDS data dirs need no TensorFlow.

A TFRecord file is a sequence of records, each laid out as
`uint64 length | uint32 masked crc32c(length) | length bytes of data | uint32 masked crc32c(data)`,
all little-endian. The reader checks every length header against its checksum and that
each record lies wholly inside the file; the data checksums are not computed (in pure
Python that would cost more than the decoding).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

from jaxlm.errors import DataError

_HEADER = struct.Struct("<QI")


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, masked the way TFRecord stores it."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path: str) -> Iterator[bytes]:
    """The records of one TFRecord file, in order; DataError naming the file if it is damaged."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        index = 0
        while True:
            start = f.tell()
            header = f.read(_HEADER.size)
            if not header:
                return
            if len(header) < _HEADER.size:
                raise DataError(f"TFRecord file {path} is truncated: record {index} at byte {start} has an "
                                f"incomplete header")
            length, length_crc = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                raise DataError(f"TFRecord file {path} is damaged or not a TFRecord file: the length of record "
                                f"{index} at byte {start} fails its checksum")
            end = start + _HEADER.size + length + 4
            if end > size:
                raise DataError(f"TFRecord file {path} is truncated: record {index} at byte {start} needs "
                                f"{end} bytes, the file has {size}")
            data = f.read(length)
            f.seek(4, os.SEEK_CUR)  # the data checksum (not verified)
            yield data
            index += 1
