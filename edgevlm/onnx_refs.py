"""The external-data locations an ONNX file refers to, read from its protobuf bytes without the onnx package.

A graph may keep tensors in other files (`TensorProto.data_location = EXTERNAL`, `external_data["location"]`).
ONNX Runtime opens those paths itself, relative to the graph's directory or, for a graph handed over as
bytes, to the working directory; older versions did not confine them (CVE-2022-25882 in onnx's loader).
The bundle reader therefore checks every location against the files the manifest lists, before any
onnxruntime call. Only the few message fields that can hold a tensor are walked; everything else is skipped.
"""

from __future__ import annotations

from .errors import BundleError

# message -> {field number: message it holds}; a tensor (TensorProto) is where locations live
_MODEL = {7: "graph", 25: "function"}  # ModelProto.graph, .functions
_SUBMESSAGES = {
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # GraphProto.node, .initializer, .sparse_initializer
    "function": {7: "node"},  # FunctionProto.node
    "node": {5: "attribute"},  # NodeProto.attribute
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},  # SparseTensorProto.values, .indices
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
    table = _MODEL if kind == "model" else _SUBMESSAGES[kind]
    for num, wire, value in _fields(buf, start, end):
        if wire == 2 and num in table:
            _walk(buf, table[num], value[0], value[1], out, depth + 1)


def external_locations(blob: bytes, name: str = "graph") -> list[str]:
    """Every external-data location named in an ONNX model file (in file order, may repeat)."""
    out: list[str] = []
    try:
        _walk(memoryview(blob), "model", 0, len(blob), out, 0)
    except ValueError as e:
        raise BundleError(f"{name} is not a well-formed ONNX file: {e}") from None
    return out
