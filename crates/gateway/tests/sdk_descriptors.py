"""Compares the messages, enums and methods of our proto/openshell.proto (a FileDescriptorSet
given as argv[1], with every file it imports: datamodel.proto, google/protobuf/*) with the published
OpenShell SDK's own descriptors, field by field, and prints one line per difference as JSON (an
empty list: wire-compatible). Every field we declare must be the SDK's (name, number, type, label,
oneof); SDK fields we leave out are counted, not differences."""
import json
import sys

from google.protobuf import descriptor_pb2
from openshell._proto import openshell_pb2

sdk = openshell_pb2.DESCRIPTOR.pool
ours = descriptor_pb2.FileDescriptorSet()
with open(sys.argv[1], "rb") as f:
    ours.ParseFromString(f.read())

diffs = []
checked = {"messages": 0, "fields": 0, "sdk_fields_not_declared": 0, "enums": 0, "methods": 0, "packages": []}


def sdk_field(f):
    """A field of the SDK's as (number, type, repeated, type name, oneof, proto3 optional)."""
    oneof = f.containing_oneof.name if f.containing_oneof and not is_synthetic(f.containing_oneof) else ""
    type_name = (f.message_type or f.enum_type).full_name if (f.message_type or f.enum_type) else ""
    return (f.number, f.type, f.is_repeated, type_name, oneof, bool(f.containing_oneof and is_synthetic(f.containing_oneof)))


def is_synthetic(oneof):
    return len(oneof.fields) == 1 and oneof.name.startswith("_") and oneof.fields[0].has_presence


def our_field(msg, f):
    oneof = msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") and not f.proto3_optional else ""
    return (f.number, f.type, f.label == f.LABEL_REPEATED, f.type_name.lstrip("."), oneof, f.proto3_optional)


def in_sdk(kind, find, full):
    """The SDK's descriptor of `full`, or None with the difference recorded."""
    try:
        return find(full)
    except KeyError:
        diffs.append(f"{kind} {full}: not in the SDK")
        return None


def compare_message(full, msg):
    checked["messages"] += 1
    theirs = in_sdk("message", sdk.FindMessageTypeByName, full)
    if theirs is None:
        return
    mine = {f.name: our_field(msg, f) for f in msg.field}
    sdks = {f.name: sdk_field(f) for f in theirs.fields}
    # A subset of the SDK's fields is wire-compatible (proto3 skips unknown fields); a field we
    # declare that the SDK lacks, or declares differently, is not.
    checked["fields"] += len(mine)
    checked["sdk_fields_not_declared"] += len(set(sdks) - set(mine))
    for name in sorted(mine):
        if mine.get(name) != sdks.get(name):
            diffs.append(f"message {full} field {name}: ours {mine.get(name)}, the SDK's {sdks.get(name)}")
    for nested in msg.nested_type:
        compare_message(f"{full}.{nested.name}", nested)
    for e in msg.enum_type:
        compare_enum(f"{full}.{e.name}", e)


def compare_enum(full, enum):
    checked["enums"] += 1
    theirs = in_sdk("enum", sdk.FindEnumTypeByName, full)
    if theirs is None:
        return
    mine = {v.name: v.number for v in enum.value}
    sdks = {v.name: v.number for v in theirs.values}
    if mine != sdks:
        diffs.append(f"enum {full}: ours {sorted(mine.items())}, the SDK's {sorted(sdks.items())}")


for file in ours.file:
    pkg = file.package
    if pkg not in checked["packages"]:
        checked["packages"].append(pkg)
    for msg in file.message_type:
        compare_message(f"{pkg}.{msg.name}", msg)
    for enum in file.enum_type:
        compare_enum(f"{pkg}.{enum.name}", enum)
    for svc in file.service:
        theirs = in_sdk("service", sdk.FindServiceByName, f"{pkg}.{svc.name}")
        if theirs is None:
            continue
        for m in svc.method:
            checked["methods"] += 1
            t = theirs.methods_by_name.get(m.name)
            if t is None:
                diffs.append(f"method {svc.name}/{m.name}: not in the SDK")
                continue
            mine = (m.input_type.lstrip("."), m.output_type.lstrip("."), m.client_streaming, m.server_streaming)
            sdks = (t.input_type.full_name, t.output_type.full_name, t.client_streaming, t.server_streaming)
            if mine != sdks:
                diffs.append(f"method {svc.name}/{m.name}: ours {mine}, the SDK's {sdks}")

print(json.dumps({"checked": checked, "differences": diffs}))
