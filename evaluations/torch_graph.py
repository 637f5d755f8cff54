"""Runs a ``graphdef.Program`` with torch ops, reproducing TensorFlow's semantics for each op type of the 2015
Inception graph: ResizeBilinear of TF1 (no half-pixel centres), Conv2D and pools with TF's SAME/VALID padding
(SAME pads the extra row/column at the bottom/right; SAME average pooling divides by the number of real pixels),
BatchNormWithGlobalNormalization, the old Concat (axis first) and ConcatV2, Reshape, MatMul, Softmax, ...

Layout: 4-D activations are NCHW inside (what torch's convolutions want; channels_last memory format on request),
constants stay in TF layout until an op converts them, and the graph's input/outputs are NHWC as in TF.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from evaluations.graphdef import GraphFormatError, OpNode, Program

Tensor = torch.Tensor
Runner = Callable[[list[Tensor]], Tensor]
_NHWC_TO_INTERNAL_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}


class UnsupportedOp(GraphFormatError):
    pass


def to_internal(x: Tensor) -> Tensor:
    """A TF-layout tensor combined with 4-D activations: NHWC broadcasting aligns trailing dims, so pad the shape to
    4 with leading ones, then NHWC -> NCHW."""
    if x.dim() > 4:
        raise GraphFormatError(f"tensor of rank {x.dim()} next to a 4-D activation")
    return x.reshape((1,) * (4 - x.dim()) + tuple(x.shape)).permute(0, 3, 1, 2)


def to_tf_layout(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1) if x.dim() == 4 else x


def _attr(node: OpNode, key: str, default=None):
    value = node.attrs.get(key, default)
    if value is None:
        raise GraphFormatError(f"node '{node.name}' ({node.op}) lacks attribute '{key}'")
    return value


def _spatial(node: OpNode, key: str) -> tuple[int, int]:
    v = _attr(node, key, [1, 1, 1, 1])
    if len(v) != 4 or v[0] != 1 or v[3] != 1:
        raise GraphFormatError(f"node '{node.name}' ({node.op}): {key}={v} is not [1, h, w, 1]")
    return v[1], v[2]


def _check_nhwc(node: OpNode) -> None:
    if node.attrs.get("data_format", "NHWC") != "NHWC":
        raise UnsupportedOp(f"node '{node.name}' ({node.op}): data_format {node.attrs['data_format']} is not "
                            "supported by the torch backend (only NHWC)")


def same_padding(size: int, k: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF's SAME: output ceil(size / stride); the odd pixel of padding goes after (bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _paddings(node: OpNode, x: Tensor, kernel, strides, dilations=(1, 1)) -> tuple[tuple[int, int], ...]:
    padding = _attr(node, "padding")
    if padding == "VALID":
        return (0, 0), (0, 0)
    if padding == "SAME":
        return tuple(same_padding(x.shape[2 + i], kernel[i], strides[i], dilations[i]) for i in range(2))
    raise UnsupportedOp(f"node '{node.name}' ({node.op}): padding {padding} is not supported by the torch backend")


def _conv2d(node: OpNode, consts: list) -> Runner:
    _check_nhwc(node)
    if consts[1] is None:
        raise UnsupportedOp(f"node '{node.name}' (Conv2D): a computed filter is not supported by the torch backend")
    weight = consts[1].permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
    bias = consts[2] if len(consts) > 2 else None  # present after batchnorm folding
    strides, dilations = _spatial(node, "strides"), _spatial(node, "dilations")
    kernel = weight.shape[2:]
    weights = {False: weight}  # and a channels_last copy, made once, when the input comes in that layout

    def run(args):
        x = args[0]
        (top, bottom), (left, right) = _paddings(node, x, kernel, strides, dilations)
        if top != bottom or left != right:  # asymmetric SAME: pad explicitly (torch pads symmetrically)
            x, top, left = F.pad(x, (left, right, top, bottom)), 0, 0
        cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        if cl not in weights:
            weights[cl] = weight.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, weights[cl], bias, strides, (top, left), dilations)
    return run


def _pool(node: OpNode, consts: list) -> Runner:
    _check_nhwc(node)
    kernel, strides, is_max = _spatial(node, "ksize"), _spatial(node, "strides"), node.op == "MaxPool"

    def run(args):
        x = args[0]
        (top, bottom), (left, right) = _paddings(node, x, kernel, strides)
        symmetric = top == bottom and left == right and 2 * max(top, left) <= min(kernel)
        if is_max:
            if not symmetric:  # padding never wins a max
                x, top, left = F.pad(x, (left, right, top, bottom), value=float("-inf")), 0, 0
            return F.max_pool2d(x, kernel, strides, (top, left))
        if symmetric:  # TF's SAME average counts only real pixels, i.e. count_include_pad=False
            return F.avg_pool2d(x, kernel, strides, (top, left), count_include_pad=False)
        padded = F.pad(x, (left, right, top, bottom))
        ones = F.pad(torch.ones_like(x[:1, :1]), (left, right, top, bottom))
        return F.avg_pool2d(padded, kernel, strides, divisor_override=1) / \
            F.avg_pool2d(ones, kernel, strides, divisor_override=1)
    return run


def _resize_bilinear(node: OpNode, consts: list) -> Runner:
    """TF's CPU kernel, step for step in float32: source coordinate ``i * scale`` (legacy) or ``(i + 0.5) * scale -
    0.5`` (half_pixel_centers), lower = max(floor, 0), upper = min(ceil, size - 1), then top = tl + (tr - tl) * dx,
    bottom likewise, top + (bottom - top) * dy. (torch's bilinear interpolate always uses half-pixel centres.)"""
    if consts[1] is None:
        raise UnsupportedOp(f"node '{node.name}' (ResizeBilinear): a computed size is not supported")
    out_h, out_w = (int(v) for v in consts[1].tolist())
    align, half = bool(node.attrs.get("align_corners", False)), bool(node.attrs.get("half_pixel_centers", False))
    cache: dict = {}

    def axis(in_size: int, out_size: int, device):
        scale = np.float32((in_size - 1) / (out_size - 1) if align and out_size > 1 else in_size / out_size)
        i = np.arange(out_size, dtype=np.float32)
        src = (i + np.float32(0.5)) * scale - np.float32(0.5) if half else i * scale
        floor = np.floor(src)
        upper = np.minimum(np.ceil(src), in_size - 1).astype(np.int64)
        lower = np.minimum(np.maximum(floor, 0).astype(np.int64), upper)
        return (torch.from_numpy(lower).to(device), torch.from_numpy(upper).to(device),
                torch.from_numpy((src - floor).astype(np.float32)).to(device))

    def run(args):
        x = args[0]
        key = (x.shape[2], x.shape[3], x.device)
        if key not in cache:
            cache[key] = axis(x.shape[2], out_h, x.device), axis(x.shape[3], out_w, x.device)
        (y0, y1, dy), (x0, x1, dx) = cache[key]
        # TF's top = tl + (tr - tl) * dx is the input row y0 interpolated along W: do that once for every input
        # row, then pick rows y0/y1 of the result. Same arithmetic per output pixel, about half the work.
        left, right = x.index_select(3, x0), x.index_select(3, x1)
        rows = left + (right - left) * dx
        top, bottom = rows.index_select(2, y0), rows.index_select(2, y1)
        return top + (bottom - top) * dy[:, None]
    return run


def _batchnorm(node: OpNode, consts: list) -> Runner:
    """BatchNormWithGlobalNormalization as TF computes it: (t - mean) * (rsqrt(var + eps) [* gamma]) + beta.
    (Usually folded into the preceding Conv2D before it gets here; see graphdef.simplify.)"""
    eps, scale_after = _attr(node, "variance_epsilon"), _attr(node, "scale_after_normalization")

    def run(args):
        t, mean, var, beta, gamma = args
        scale = torch.rsqrt(var + eps) * gamma if scale_after else torch.rsqrt(var + eps)
        c = (1, -1, 1, 1) if t.dim() == 4 else (-1,)
        return (t - mean.reshape(c)) * scale.reshape(c) + beta.reshape(c)
    return run


def _binary(fn) -> Callable[[OpNode, list], Runner]:
    def build(node: OpNode, consts: list) -> Runner:
        def run(args):
            a, b = args
            if max(a.dim(), b.dim()) == 4:  # bring a TF-layout operand (constant or lower rank) to NCHW
                a = a if a.dim() == 4 and consts[0] is None else to_internal(a)
                b = b if b.dim() == 4 and consts[1] is None else to_internal(b)
            return fn(a, b)
        return run
    return build


def _bias_add(node: OpNode, consts: list) -> Runner:
    _check_nhwc(node)
    return lambda args: args[0] + (args[1].reshape(1, -1, 1, 1) if args[0].dim() == 4 else args[1])


def _concat(axis_first: bool) -> Callable[[OpNode, list], Runner]:
    def build(node: OpNode, consts: list) -> Runner:
        axis_t = consts[0] if axis_first else consts[-1]
        if axis_t is None:
            raise UnsupportedOp(f"node '{node.name}' ({node.op}): a computed axis is not supported")
        axis = int(axis_t.item())

        def run(args):
            values = args[1:] if axis_first else args[:-1]
            rank = values[0].dim()
            ax = axis % rank
            return torch.cat(values, _NHWC_TO_INTERNAL_AXIS[ax] if rank == 4 else ax)
        return run
    return build


def _reshape(node: OpNode, consts: list) -> Runner:
    if consts[1] is None:
        raise UnsupportedOp(f"node '{node.name}' (Reshape): a computed shape is not supported")
    shape = [int(v) for v in consts[1].tolist()]

    def run(args):
        x = to_tf_layout(args[0])
        try:
            y = x.reshape(shape)
        except RuntimeError:
            raise GraphFormatError(f"node '{node.name}' (Reshape): cannot reshape {list(x.shape)} to {shape}") from None
        return y.permute(0, 3, 1, 2) if y.dim() == 4 else y
    return run


def _matmul(node: OpNode, consts: list) -> Runner:
    ta, tb = bool(node.attrs.get("transpose_a", False)), bool(node.attrs.get("transpose_b", False))
    return lambda args: (args[0].T if ta else args[0]) @ (args[1].T if tb else args[1])


def _softmax(node: OpNode, consts: list) -> Runner:
    return lambda args: torch.softmax(args[0], dim=1 if args[0].dim() == 4 else -1)


OPS: dict[str, Callable[[OpNode, list], Runner]] = {
    "ResizeBilinear": _resize_bilinear,
    "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Add": _binary(torch.add), "AddV2": _binary(torch.add),
    "RealDiv": _binary(torch.div), "BiasAdd": _bias_add,
    "Conv2D": _conv2d, "BatchNormWithGlobalNormalization": _batchnorm, "Relu": lambda n, c: lambda a: F.relu(a[0]),
    "MaxPool": _pool, "AvgPool": _pool, "Concat": _concat(True), "ConcatV2": _concat(False),
    "Reshape": _reshape, "MatMul": _matmul, "Softmax": _softmax,
    "Identity": lambda n, c: lambda a: a[0], "CheckNumerics": lambda n, c: lambda a: a[0],
}


class TorchGraph:
    """``graph(x)`` with x the program's input (NHWC float32) returns {output name: NHWC tensor}. Intermediate
    activations are dropped after their last use, so memory stays at a few layers' worth."""

    def __init__(self, program: Program, device: torch.device | str = "cpu", channels_last: bool = False):
        unknown = sorted({n.op for n in program.nodes} - OPS.keys())
        if unknown:
            node = next(n for n in program.nodes if n.op == unknown[0])
            raise UnsupportedOp(f"op {unknown[0]} (node '{node.name}') is not supported by the torch backend"
                                + (f"; also unsupported: {', '.join(unknown[1:])}" if unknown[1:] else ""))
        self.program, self.channels_last = program, channels_last
        self.consts = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in program.consts.items()}
        produced = {program.input} | {f"{n.name}:0" for n in program.nodes}
        for n in program.nodes:
            for r in n.inputs:
                if r not in produced and r not in self.consts:
                    raise GraphFormatError(f"node '{n.name}' reads '{r}', which is neither computed nor a constant "
                                           "(only output 0 of each op is supported)")
        missing = [o for o in program.outputs if o not in produced]
        if missing:
            raise GraphFormatError(f"output {missing[0]} is not computed by the program")
        self.steps = []
        last_use = {}
        for i, n in enumerate(program.nodes):
            for r in n.inputs:
                last_use[r] = i
        for i, n in enumerate(program.nodes):
            consts = [self.consts.get(r) for r in n.inputs]
            frees = [r for r in dict.fromkeys(n.inputs) if last_use[r] == i and r not in self.consts
                     and r not in program.outputs]
            self.steps.append((f"{n.name}:0", n.inputs, consts, OPS[n.op](n, consts), frees))

    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        x = x.permute(0, 3, 1, 2)
        env = {self.program.input: x.contiguous(memory_format=torch.channels_last if self.channels_last
                                                 else torch.contiguous_format)}
        for out, inputs, consts, run, frees in self.steps:
            env[out] = run([env[r] if c is None else c for r, c in zip(inputs, consts)])
            for r in frees:
                del env[r]
        return {o: to_tf_layout(env[o]) for o in self.program.outputs}
