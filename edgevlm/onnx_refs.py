"""The external-data locations an ONNX file refers to, read from its protobuf bytes without the onnx package.

A graph may keep tensors in other files (`TensorProto.data_location = EXTERNAL`, `external_data["location"]`).
ONNX Runtime opens those paths itself, relative to the graph's directory or, for a graph handed over as
bytes, to the working directory; older versions did not confine them (CVE-2022-25882 in onnx's loader).
The bundle reader therefore checks every location against the files the manifest lists, before any
onnxruntime call. Only the few message fields that can hold a tensor are walked; everything else is skipped.
"""

from __future__ import annotations

from .errors import BundleError

# message -> {field number: message it holds}; a tensor (TensorProto) is where locations live. Every field of
# onnx.proto (IR 11) that can hold a tensor, directly or through a graph, function or attribute, is listed;
# a length-delimited field a table does not know (a future field) is walked generically (`_unknown`).
_MODEL = {7: "graph", 20: "training", 25: "function"}  # ModelProto.graph, .training_info, .functions
_SUBMESSAGES = {
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # GraphProto.node, .initializer, .sparse_initializer
    "training": {1: "graph", 2: "graph"},  # TrainingInfoProto.initialization, .algorithm
    "function": {7: "node", 11: "attribute"},  # FunctionProto.node, .attribute_proto (attribute defaults)
    "node": {5: "attribute"},  # NodeProto.attribute
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},  # SparseTensorProto.values, .indices
}
# length-delimited fields known to hold no tensor (names, docs, strings, packed numbers, type protos, ...)
_LEAVES = {
    "model": {2, 3, 4, 6, 8, 14},  # producer_name/version, domain, doc_string, opset_import, metadata_props
    "graph": {2, 10, 11, 12, 13, 14, 16},  # name, doc_string, input, output, value_info, quantization, metadata
    "training": {3, 4},  # initialization_binding, update_binding
    "function": {1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 13, 14},  # name, input, output, attribute names, doc, ...
    "node": {1, 2, 3, 4, 6, 7, 8, 9},  # input, output, name, op_type, doc_string, domain, overload, metadata
    "attribute": {1, 4, 7, 8, 9, 13, 14, 15, 21},  # name, s, floats, ints, strings, doc, type protos, ref
    "sparse": {3},  # dims (packed)
}
_MAX_DEPTH = 64  # subgraphs nest (If / Loop bodies); a deeper file is refused, not recursed into


def _varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= end or shift > 63:
            raise ValueError("bad varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field) of one message."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i, end)
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 5:
            value, i = None, i + 4
        elif wire == 2:
            n, i = _varint(buf, i, end)
            value, i = (i, i + n), i + n
        else:  # groups (3, 4) are not used by ONNX
            raise ValueError(f"unsupported wire type {wire}")
        if i > end:
            raise ValueError("field runs past its message")
        yield num, wire, value


def _tensor_locations(buf: memoryview, start: int, end: int, out: list[str]) -> None:
    external, locations = False, []
    for num, wire, value in _fields(buf, start, end):
        if num == 14 and wire == 0:  # data_location
            external = value == 1
        elif num == 13 and wire == 2:  # external_data: StringStringEntryProto {key = 1, value = 2}
            entry = {}
            for n, w, v in _fields(buf, *value):
                if w == 2 and n in (1, 2):
                    entry[n] = bytes(buf[v[0]:v[1]]).decode("utf-8", "replace")
            if entry.get(1) == "location":
                locations.append(entry.get(2, ""))
    if external or locations:
        out.extend(locations or [""])


def _walk(buf: memoryview, kind: str, start: int, end: int, out: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("graphs nested too deeply")
    if kind == "tensor":
        _tensor_locations(buf, start, end, out)
        return
    table, leaves = (_MODEL if kind == "model" else _SUBMESSAGES[kind]), _LEAVES[kind]
    for num, wire, value in _fields(buf, start, end):
        if wire != 2:
            continue
        if num in table:
            _walk(buf, table[num], value[0], value[1], out, depth + 1)
        elif num not in leaves:
            _unknown(buf, value[0], value[1], out, depth + 1)


def _unknown(buf: memoryview, start: int, end: int, out: list[str], depth: int) -> None:
    """A field no table knows: if its bytes parse as a message, any tensor-like part of it (an external-data
    location, field 13, or data_location EXTERNAL, field 14 -- TensorProto's numbers) counts, at any depth."""
    if depth > _MAX_DEPTH:
        raise ValueError("graphs nested too deeply")
    try:
        fields = list(_fields(buf, start, end))
    except ValueError:
        return  # not a message: a string or bytes
    if any(num == 14 and wire == 0 and value == 1 for num, wire, value in fields) or \
            any(num == 13 and wire == 2 for num, wire, _ in fields):
        before = len(out)
        _tensor_locations(buf, start, end, out)
        if len(out) > before:
            return
    for num, wire, value in fields:
        if wire == 2 and value[1] > value[0]:
            _unknown(buf, value[0], value[1], out, depth + 1)


def external_locations(blob: bytes, name: str = "graph") -> list[str]:
    """Every external-data location named in an ONNX model file (in file order, may repeat)."""
    out: list[str] = []
    try:
        _walk(memoryview(blob), "model", 0, len(blob), out, 0)
    except ValueError as e:
        raise BundleError(f"{name} is not a well-formed ONNX file: {e}") from None
    return out
