"""A message's array records carried as one array each between a deployed coordinator and its sites, restored
exactly on arrival.

Why: Flower moves every array of a message as its own object, one request per object at each hop (ServerApp to
SuperLink, SuperLink to SuperNode, SuperNode to the site's runtime, and back for the reply). A model of 22 tensors is
48 objects a message; on loopback each request costs tens of milliseconds, so a small deployed round spent seconds
moving a few kilobytes (docs/deploy.md, Speed). Packed, a message is about seven objects.

How: ``pack`` turns each ArrayRecord of a message's content into an ArrayRecord holding one byte array (the arrays'
bytes back to back) and records the layout (name, dtype, shape of each array, in order) in a ConfigRecord named
``LAYOUT_RECORD``. ``unpack`` checks the layout against the bytes (known dtypes only, shapes that add up to exactly the
bytes sent, no repeated name) before it reads anything, and rebuilds the same arrays in the same order; anything else
is refused with the reason. The coordinator packs only on a deployment (``server.polling_grid``); a site unpacks what
arrives packed and packs its reply only then (``client.app``), so the Simulation Engine and an unpacking peer see
plain records. Nothing about the content changes: the same values, bit for bit.
"""

from __future__ import annotations

import json
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from common.errors import FedtailError

LAYOUT_RECORD = "fedtail-packed-layout"
PACKED_KEY = "packed"
DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"})


class PackedRecordError(FedtailError):
    """A packed record whose layout does not describe its bytes."""


def pack(content: RecordDict) -> RecordDict:
    """The same content with each ArrayRecord as one byte array and the layouts in ``LAYOUT_RECORD``."""
    packed = RecordDict()
    layouts = ConfigRecord()
    for name, record in content.items():
        if not isinstance(record, ArrayRecord):
            packed[name] = record
            continue
        arrays = [(key, np.ascontiguousarray(array.numpy())) for key, array in record.items()]
        layouts[name] = json.dumps([[key, str(value.dtype), list(value.shape)] for key, value in arrays])
        data = b"".join(value.tobytes() for _, value in arrays)
        packed[name] = ArrayRecord({PACKED_KEY: Array(np.frombuffer(data, dtype=np.uint8))})
    if layouts:
        packed[LAYOUT_RECORD] = layouts
    return packed


def is_packed(content: RecordDict) -> bool:
    return LAYOUT_RECORD in content


def unpack(content: RecordDict) -> RecordDict:
    """The content ``pack`` was given; a layout that does not match its bytes is refused."""
    layout_record = content.get(LAYOUT_RECORD)
    if not isinstance(layout_record, ConfigRecord):
        raise PackedRecordError(f"packed message: {LAYOUT_RECORD!r} is missing or not a config record")
    plain = RecordDict()
    for name, record in content.items():
        if name == LAYOUT_RECORD:
            continue
        if name in layout_record:
            if not isinstance(record, ArrayRecord):
                raise PackedRecordError(f"packed message: {name!r} has a layout but is not an array record")
            plain[name] = _unpack_record(name, record, layout_record[name])
        else:
            plain[name] = record
    missing = sorted(set(layout_record) - set(content))
    if missing:
        raise PackedRecordError(f"packed message: layouts for records it does not hold: {missing}")
    return plain


def _unpack_record(name: str, record: ArrayRecord, layout_text: object) -> ArrayRecord:
    if list(record) != [PACKED_KEY]:
        raise PackedRecordError(f"packed record {name!r}: expected one array {PACKED_KEY!r}, got {list(record)}")
    data = record[PACKED_KEY].numpy()
    if data.dtype != np.uint8 or data.ndim != 1:
        raise PackedRecordError(f"packed record {name!r}: expected bytes, got {data.dtype} of shape {data.shape}")
    entries = _layout(name, layout_text)
    sizes = [math.prod(shape) * np.dtype(dtype).itemsize for _, dtype, shape in entries]
    if sum(sizes) != data.size:
        raise PackedRecordError(f"packed record {name!r}: the layout describes {sum(sizes)} bytes, {data.size} came")
    arrays: dict[str, Array] = {}
    offset = 0
    for (key, dtype, shape), size in zip(entries, sizes, strict=True):
        value = np.frombuffer(data[offset:offset + size].tobytes(), dtype=np.dtype(dtype)).reshape(shape)
        arrays[key] = Array(value)
        offset += size
    return ArrayRecord(arrays)


def _layout(name: str, text: object) -> list[tuple[str, str, list[int]]]:
    """The layout's entries, each checked: a new name, a known dtype, a shape of non-negative integers."""
    try:
        entries = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        entries = None
    if not isinstance(entries, list):
        raise PackedRecordError(f"packed record {name!r}: its layout is not a JSON list")
    checked: list[tuple[str, str, list[int]]] = []
    for entry in entries:
        valid = (
            isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[1] in DTYPES
            and isinstance(entry[2], list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry[2])
        )
        if not valid:
            raise PackedRecordError(f"packed record {name!r}: bad layout entry {str(entry)[:200]}")
        if any(entry[0] == key for key, _, _ in checked):
            raise PackedRecordError(f"packed record {name!r}: array {entry[0]!r} appears twice")
        checked.append((entry[0], entry[1], entry[2]))
    return checked


def packed_arrays_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: unpack what arrived packed, and pack the reply to it the same way."""
    if not (message.has_content() and is_packed(message.content)):
        return call_next(message, context)
    message.content = unpack(message.content)
    reply = call_next(message, context)
    if reply.has_content():
        reply.content = pack(reply.content)
    return reply
