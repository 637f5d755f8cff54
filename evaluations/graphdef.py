"""Reading a frozen TensorFlow GraphDef without TensorFlow: the protobuf classes that ship with tensorboard
(``tensorboard.compat.proto``) parse the file, and the part of the graph between one input tensor and the wanted
outputs becomes a ``Program``: op nodes in execution order plus their constants as numpy arrays.

Two rewrites keep the program small and fast, neither changing what it computes beyond float32 rounding:
Identity / CheckNumerics nodes become aliases (the 2015 Inception graph wraps every layer in a CheckNumerics
plus a control-dependency Identity), and a BatchNormWithGlobalNormalization that is the only consumer of a
Conv2D is folded into that convolution's filter and a bias.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluations.errors import EvaluatorInputError

# TensorFlow DataType enum values (tensorflow/core/framework/types.proto) -> (numpy dtype, TensorProto field).
_DTYPES = {1: (np.float32, "float_val"), 2: (np.float64, "double_val"), 3: (np.int32, "int_val"),
           4: (np.uint8, "int_val"), 5: (np.int16, "int_val"), 6: (np.int8, "int_val"), 9: (np.int64, "int64_val"),
           10: (np.bool_, "bool_val"), 19: (np.float16, "half_val")}
_ALIAS_OPS = ("Identity", "CheckNumerics")  # CheckNumerics only raises on nan/inf; its value is its input


class GraphFormatError(EvaluatorInputError):
    """The graph cannot be read or lacks what is asked of it; the message names the node."""


@dataclass
class OpNode:
    name: str
    op: str
    inputs: list[str]  # tensor references "node:index"; control inputs are dropped
    attrs: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable values


@dataclass
class Program:
    input: str  # tensor fed in place of the graph's own producer (ADM: "ExpandDims:0")
    outputs: list[str]
    nodes: list[OpNode]  # in execution order; Const nodes are not listed, their values are in `consts`
    consts: dict[str, np.ndarray]  # keyed by tensor reference "node:0"

    def to_json(self) -> dict:
        return {"input": self.input, "outputs": self.outputs,
                "nodes": [[n.name, n.op, n.inputs, n.attrs] for n in self.nodes]}

    @classmethod
    def from_json(cls, data: dict, consts: dict[str, np.ndarray]) -> "Program":
        return cls(data["input"], list(data["outputs"]), [OpNode(*n) for n in data["nodes"]], consts)


def tensor_ref(name: str) -> str:
    """'conv' -> 'conv:0'; 'split:1' stays."""
    node, _, index = name.partition(":")
    return f"{node}:{index or 0}"


def read_graph_def(path: str | os.PathLike):
    from tensorboard.compat.proto import graph_pb2  # tensorboard's copy of TF's protos: no TensorFlow import

    graph_def = graph_pb2.GraphDef()
    try:
        graph_def.ParseFromString(Path(path).read_bytes())
    except Exception as e:  # DecodeError; e.g. an HTML error page saved as .pb
        raise GraphFormatError(f"{path}: not a TensorFlow GraphDef ({type(e).__name__})") from None
    if not graph_def.node:
        raise GraphFormatError(f"{path}: not a TensorFlow GraphDef (no nodes)")
    return graph_def


def tensor_to_numpy(tensor, where: str = "tensor") -> np.ndarray:
    """A TensorProto as an array: from ``tensor_content`` (raw little-endian bytes, how TF stores large
    constants) or from the typed value list, where fewer values than elements means the last one repeats."""
    if tensor.dtype not in _DTYPES:
        raise GraphFormatError(f"{where}: constants of TensorFlow dtype {tensor.dtype} are not supported")
    dtype, values_field = _DTYPES[tensor.dtype]
    shape = tuple(d.size for d in tensor.tensor_shape.dim)
    size = int(np.prod(shape, dtype=np.int64))
    if tensor.tensor_content:
        return np.frombuffer(tensor.tensor_content, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype) \
            .reshape(shape)
    values = list(getattr(tensor, values_field))
    if dtype == np.float16:  # half_val holds the raw 16-bit patterns
        values = np.array(values, np.uint16).view(np.float16)
    values = np.asarray(values, dtype)
    if len(values) == size:
        return values.reshape(shape)
    if len(values) == 0:
        return np.zeros(shape, dtype)
    return np.concatenate([values, np.repeat(values[-1:], size - len(values))]).reshape(shape)


def _attr_value(value, where: str) -> Any:
    kind = value.WhichOneof("value")
    if kind == "list":
        lst = value.list
        for name in ("s", "i", "f", "b", "type"):
            items = list(getattr(lst, name))
            if items:
                return [v.decode() for v in items] if name == "s" else items
        if lst.shape or lst.tensor or lst.func:
            raise GraphFormatError(f"{where}: list attributes of shapes/tensors/functions are not supported")
        return []
    if kind == "s":
        return value.s.decode(errors="replace")
    if kind in ("i", "f", "b", "type"):
        return getattr(value, kind)
    if kind == "shape":
        return None if value.shape.unknown_rank else [d.size for d in value.shape.dim]
    if kind is None:
        return None
    raise GraphFormatError(f"{where}: attribute of kind '{kind}' is not supported")


def extract_program(graph_def, input_tensor: str, outputs: list[str], where: str = "graph") -> Program:
    """The nodes needed to compute ``outputs`` from ``input_tensor``, in execution order (TF graphs are DAGs)."""
    by_name = {n.name: n for n in graph_def.node}
    input_tensor, outputs = tensor_ref(input_tensor), [tensor_ref(o) for o in outputs]
    if input_tensor.split(":")[0] not in by_name:
        raise GraphFormatError(f"{where}: no node '{input_tensor.split(':')[0]}' (the input tensor {input_tensor})")
    order, consts, seen = [], {}, set()
    stack = [(o.split(":")[0], False) for o in reversed(outputs)]
    while stack:  # iterative post-order DFS: the real graph is a few hundred nodes deep
        name, expanded = stack.pop()
        if expanded:
            order.append(name)
            continue
        if name in seen:
            continue
        if name not in by_name:
            raise GraphFormatError(f"{where}: no node '{name}'")
        seen.add(name)
        node = by_name[name]
        if node.op == "Const":
            consts[f"{name}:0"] = tensor_to_numpy(node.attr["value"].tensor, f"{where}: node '{name}'")
            continue
        stack.append((name, True))
        for inp in reversed(node.input):
            ref = tensor_ref(inp)
            if not inp.startswith("^") and ref != input_tensor:
                stack.append((ref.split(":")[0], False))
    nodes = []
    for name in order:
        node = by_name[name]
        attrs = {k: _attr_value(v, f"{where}: node '{name}' attribute '{k}'") for k, v in node.attr.items()}
        inputs = [tensor_ref(i) for i in node.input if not i.startswith("^")]
        nodes.append(OpNode(name, node.op, inputs, attrs))
    return Program(input_tensor, outputs, nodes, consts)


def constant_input(graph_def, node_name: str, input_index: int, where: str = "graph") -> np.ndarray:
    """The constant feeding input ``input_index`` of ``node_name``, through Identity nodes (ADM's softmax weights:
    input 1 of ``softmax/logits/MatMul``)."""
    by_name = {n.name: n for n in graph_def.node}
    node = by_name.get(node_name)
    if node is None:
        raise GraphFormatError(f"{where}: no node '{node_name}'")
    data_inputs = [i for i in node.input if not i.startswith("^")]
    if len(data_inputs) <= input_index:
        raise GraphFormatError(f"{where}: node '{node_name}' has no input {input_index}")
    src = by_name.get(tensor_ref(data_inputs[input_index]).split(":")[0])
    while src is not None and src.op in _ALIAS_OPS:
        src = by_name.get(tensor_ref(src.input[0]).split(":")[0])
    if src is None or src.op != "Const":
        raise GraphFormatError(f"{where}: input {input_index} of '{node_name}' is not a constant")
    return tensor_to_numpy(src.attr["value"].tensor, f"{where}: node '{src.name}'")


def simplify(program: Program) -> Program:
    """Aliases for Identity/CheckNumerics, BatchNormWithGlobalNormalization folded into its Conv2D, unused
    constants dropped. Requested outputs keep their names."""
    keep = set(program.outputs)
    nodes = _remove_aliases(program.nodes, keep)
    consts = dict(program.consts)
    nodes = _remove_aliases(_fold_batchnorm(nodes, consts, keep), keep)
    used = {r for n in nodes for r in n.inputs}
    return Program(program.input, program.outputs, nodes, {k: v for k, v in consts.items() if k in used})


def _remove_aliases(nodes: list[OpNode], keep: set[str]) -> list[OpNode]:
    alias: dict[str, str] = {}
    kept = []
    for n in nodes:  # execution order, so an alias's source is already resolved
        n = OpNode(n.name, n.op, [alias.get(r, r) for r in n.inputs], n.attrs)  # a copy: the caller's stays intact
        if n.op in _ALIAS_OPS and n.inputs and f"{n.name}:0" not in keep:
            alias[f"{n.name}:0"] = n.inputs[0]
        else:
            kept.append(n)
    return kept


def _fold_batchnorm(nodes: list[OpNode], consts: dict[str, np.ndarray], keep: set[str]) -> list[OpNode]:
    """conv(x, W) then (y - mean) * s + beta, s = rsqrt(var + eps) [* gamma], equals conv(x, W * s) + (beta -
    mean * s): one convolution with a bias instead of a convolution and a normalisation pass over memory.
    (W * s is computed in float64 and rounded once; TF rounds conv and normalisation separately, a difference of
    float32 rounding.)"""
    consumers: dict[str, int] = {}
    for n in nodes:
        for r in n.inputs:
            consumers[r] = consumers.get(r, 0) + 1
    by_output = {f"{n.name}:0": n for n in nodes}
    out, folded = [], {}
    for n in nodes:
        conv = by_output.get(n.inputs[0]) if n.op == "BatchNormWithGlobalNormalization" else None
        if (conv is None or conv.op != "Conv2D" or len(conv.inputs) != 2 or consumers[n.inputs[0]] != 1
                or n.inputs[0] in keep or not all(r in consts for r in n.inputs[1:]) or conv.inputs[1] not in consts
                or not {"variance_epsilon", "scale_after_normalization"} <= n.attrs.keys()):
            out.append(n)
            continue
        mean, var, beta, gamma = (consts[r].astype(np.float64) for r in n.inputs[1:])
        scale = 1 / np.sqrt(var + n.attrs["variance_epsilon"])
        if n.attrs["scale_after_normalization"]:
            scale = scale * gamma
        w_ref, b_ref = f"{conv.name}/folded_filter:0", f"{conv.name}/folded_bias:0"
        consts[w_ref] = (consts[conv.inputs[1]].astype(np.float64) * scale).astype(np.float32)  # HWIO: O is last
        consts[b_ref] = (beta - mean * scale).astype(np.float32)
        folded[conv.name] = OpNode(conv.name, "Conv2D", [conv.inputs[0], w_ref, b_ref], conv.attrs)
        out.append(OpNode(n.name, "Identity", [n.inputs[0]], {}))  # the normalisation's output is the conv's now
    return [folded.get(n.name, n) for n in out]
