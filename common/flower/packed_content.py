"""A message's whole content carried as one byte string between a deployed coordinator and its sites, restored
exactly on arrival.

Why: Flower moves a message as a tree of objects (the content, each record, each array and its chunks), one request
per object at each hop (ServerApp to SuperLink, SuperLink to SuperNode, SuperNode to the site's runtime, and back for
the reply). On a loaded machine each request costs 20 to 60 ms, so a small deployed round spent most of its time
moving a few kilobytes: 48 objects a message for the benchmark model plain, 8 with each array record packed
(docs/deploy.md, Speed). Packed whole, a message is two objects: its content and one config record.

How: ``pack`` serialises the content with Flower's own protobuf form of a RecordDict (``flwr.common.serde``, the
format Flower itself used on the wire before it moved to object trees) into a single ``bytes`` value of a
ConfigRecord named ``PACKED_RECORD``. ``unpack`` parses it back and checks every array's bytes against the dtype and
shape it declares before anyone reads it (numpy's own format, never pickled); anything else is refused with the
reason. The coordinator packs only on a deployment (``polling_grid``); a site unpacks what arrives packed and
packs its reply only then (``packed_content_mod``), so the Simulation Engine and an unpacking peer see plain
records. Nothing about the content changes: the same records, in order, the same values bit for bit. What a packed
message may carry is what a plain one may: the site's checks on the coordinator's records run after unpacking.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from google.protobuf.message import DecodeError

from common.errors import FedtailError

PACKED_RECORD = "fedtail-packed"
PACKED_KEY = "recorddict"


class PackedContentError(FedtailError):
    """Packed content that is not a well-formed RecordDict."""


def pack(content: RecordDict) -> RecordDict:
    """The content as one config record holding its protobuf bytes."""
    data = recorddict_to_proto(content).SerializeToString()
    return RecordDict({PACKED_RECORD: ConfigRecord({PACKED_KEY: data})})


def is_packed(content: RecordDict) -> bool:
    return PACKED_RECORD in content


def unpack(content: RecordDict) -> RecordDict:
    """The content ``pack`` was given; bytes that do not parse, or arrays that do not match what they declare, are
    refused."""
    if list(content) != [PACKED_RECORD]:
        raise PackedContentError(f"packed message: expected the one record {PACKED_RECORD!r}, got {list(content)}")
    record = content[PACKED_RECORD]
    if not (isinstance(record, ConfigRecord) and list(record) == [PACKED_KEY]):
        raise PackedContentError(f"packed message: {PACKED_RECORD!r} is not a config record with one value "
                                 f"{PACKED_KEY!r}")
    data = record[PACKED_KEY]
    if not isinstance(data, bytes):
        raise PackedContentError(f"packed message: {PACKED_KEY!r} holds {type(data).__name__}, not bytes")
    try:
        plain = recorddict_from_proto(ProtoRecordDict.FromString(data))
    except (DecodeError, ValueError, TypeError) as error:
        raise PackedContentError(f"packed message: its bytes are not a RecordDict ({error})") from None
    for name, inner in plain.items():
        if isinstance(inner, ArrayRecord):
            for key, array in inner.items():
                _check_array(f"{name}/{key}", array)
    return plain


def _check_array(where: str, array: Array) -> None:
    """The array's bytes are numpy's format (Flower reads them without pickles) and hold the dtype and shape the
    array declares."""
    try:
        value = array.numpy()
    except (ValueError, TypeError, OSError, EOFError) as error:
        raise PackedContentError(f"packed message: array {where!r} does not decode ({error})") from None
    if str(value.dtype) != array.dtype or tuple(value.shape) != tuple(array.shape):
        raise PackedContentError(f"packed message: array {where!r} declares {array.dtype} {tuple(array.shape)}, "
                                 f"holds {value.dtype} {value.shape}")


def packed_content_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: unpack what arrived packed, and pack the reply to it the same way."""
    if not (message.has_content() and is_packed(message.content)):
        return call_next(message, context)
    message.content = unpack(message.content)
    reply = call_next(message, context)
    if reply.has_content():
        reply.content = pack(reply.content)
    return reply
