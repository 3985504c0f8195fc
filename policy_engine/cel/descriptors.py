"""The context messages as protobuf descriptors, for the C++ engine's type checker.

The checker only knows a message's fields from a descriptor, and only that makes
``conn.ipp`` or ``conn.auth_failures > "a"`` an error with a column. Each message of
:mod:`policy_engine.language.contexts` becomes one proto3 file in package ``pe``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2

from policy_engine.cel.checks import container
from policy_engine.language.contexts import MessageType

PACKAGE: Final = "pe"

_FIELD = descriptor_pb2.FieldDescriptorProto
_SCALAR_FIELDS: Final[Mapping[str, Any]] = {
    "string": _FIELD.TYPE_STRING,
    "int": _FIELD.TYPE_INT64,
    "bool": _FIELD.TYPE_BOOL,
    "double": _FIELD.TYPE_DOUBLE,
}


def descriptor_pool_for(messages: Iterable[MessageType]) -> descriptor_pool.DescriptorPool:
    """A pool holding ``google.protobuf.Struct`` (for ``dyn`` fields) and ``messages``."""
    pool = descriptor_pool.DescriptorPool()
    struct_file = descriptor_pb2.FileDescriptorProto()
    struct_pb2.DESCRIPTOR.CopyToProto(struct_file)
    pool.Add(struct_file)
    for message in messages:
        pool.Add(_message_file(message))
    return pool


def scalar(kind: str) -> str:
    """``kind`` itself when a context field may have it as a scalar type."""
    if kind not in _SCALAR_FIELDS and kind != "dyn":
        raise ValueError(f"unsupported context field type {kind!r}")
    return kind


def _message_file(message: MessageType) -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name=f"{PACKAGE}/{message.name}.proto",
        package=PACKAGE,
        syntax="proto3",
        dependency=[struct_pb2.DESCRIPTOR.name],
    )
    proto = file.message_type.add(name=message.name)
    for number, (name, kind) in enumerate(message.fields.items(), start=1):
        holder = container(kind)
        if holder is None:
            _set_scalar(proto.field.add(name=name, number=number), kind)
        elif holder[0] == "list":
            repeated = proto.field.add(name=name, number=number, label=_FIELD.LABEL_REPEATED)
            _set_scalar(repeated, holder[1])
        else:
            entry_name = "".join(part[:1].upper() + part[1:] for part in name.split("_"))
            entry = proto.nested_type.add(name=f"{entry_name}Entry")  # protobuf's own naming
            entry.options.map_entry = True
            _set_scalar(entry.field.add(name="key", number=1), "string")
            _set_scalar(entry.field.add(name="value", number=2), holder[1])
            proto.field.add(
                name=name,
                number=number,
                label=_FIELD.LABEL_REPEATED,
                type=_FIELD.TYPE_MESSAGE,
                type_name=f".{PACKAGE}.{message.name}.{entry.name}",
            )
    return file


def _set_scalar(proto_field: descriptor_pb2.FieldDescriptorProto, kind: str) -> None:
    if not proto_field.HasField("label"):
        proto_field.label = _FIELD.LABEL_OPTIONAL
    if scalar(kind) == "dyn":
        proto_field.type = _FIELD.TYPE_MESSAGE
        proto_field.type_name = ".google.protobuf.Value"
    else:
        proto_field.type = _SCALAR_FIELDS[scalar(kind)]
