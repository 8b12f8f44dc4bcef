"""dlib's descriptor network (as read by dat.py) as an ONNX graph, with the attribute views as outputs.

    >>> model = build_graph(read_dat(path))      # an onnx.ModelProto
    >>> onnx.save(model, "resnet.onnx")

Input "chips": (N, 150, 150, 3) uint8, the chips of dlib.get_face_chip(img, shape, 150, 0.25).
Outputs, all float32:
    "descriptor" (N, 128)  dlib's face descriptor (not normalised), what compute_face_descriptor gives
    "pooled"     (N, 256)  the global-average-pooled vector before the fc layer
    "eyes", "mouth", "lower" (N, 192)  level-3 (64 ch, 17x17) then level-2 (128 ch, 8x8) maps, each
                           averaged over a band of chip rows (BANDS) mapped to the map's rows
The network is dlib's dnn_face_recognition_ex.cpp (ARCHITECTURE); each affine layer folds into the
conv before it, and dlib's add_prev (larger size in every dimension, zero-filled at the end of each
axis) is Pad then Add.
"""
from __future__ import annotations

import math

import numpy as np

from workers.descriptor.dat import DatFormatError, DlibNet, Layer

#: Bump when the graph built from the same file changes (the cached .onnx is keyed by it).
GRAPH_VERSION = 1
OPSET = 17
CHIP_SIZE = 150

#: Residual blocks from the input on, per level: (level, channels, downsampling first block).
ARCHITECTURE = ([(4, 32, False)] * 3 + [(3, 64, True)] + [(3, 64, False)] * 3
                + [(2, 128, True)] + [(2, 128, False)] * 2
                + [(1, 256, True)] + [(1, 256, False)] * 2 + [(0, 256, True)])

#: Chip rows (of 150, start inclusive, end exclusive) each view averages the maps over.
BANDS = {"eyes": (28, 62), "mouth": (92, 124), "lower": (95, 150)}
#: Levels whose output maps the band views pool, in the order they are concatenated.
VIEW_LEVELS = (3, 2)


def band_rows(band: tuple[int, int], rows: int) -> tuple[int, int]:
    """The rows [start, end) of a map with `rows` rows that cover chip rows band[0]..band[1]."""
    start, end = band
    return math.floor(start * rows / CHIP_SIZE), math.ceil(end * rows / CHIP_SIZE)


def expected_versions() -> list[int]:
    """dlib's wrapper versions for ARCHITECTURE, outermost first (1 = tag/skip, 2 = layer, 3 = first)."""
    inner = [3, 2, 2, 2]                        # con, affine, relu, max_pool on the input
    for _, _, down in ARCHITECTURE:
        block = [1] + [2] * 5                   # tag1, con, affine, relu, con, affine
        inner += block + ([1, 1, 2, 2, 2] if down else [2, 2])   # [tag2, skip1, avg_pool,] add, relu
    inner += [2, 2]                             # avg_pool_everything, fc
    return inner[::-1]


class _Builder:
    def __init__(self, layers: list[Layer]):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.layers, self.next = layers, 0
        self.nodes, self.inits, self.count = [], [], 0

    def take(self, kind: str) -> Layer:
        if self.next >= len(self.layers) or self.layers[self.next].kind != kind:
            found = self.layers[self.next].kind if self.next < len(self.layers) else "the end"
            raise DatFormatError(f"layer {self.next}: expected {kind}, found {found}")
        self.next += 1
        return self.layers[self.next - 1]

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, array: np.ndarray, stem: str = "c") -> str:
        name = self.name(stem)
        self.inits.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        output = output or self.name(op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [output], **attrs))
        return output

    def conv(self, x: str, shape: tuple[int, int, int]) -> tuple[str, tuple[int, int, int]]:
        """con then affine, folded: gamma * (W x + b) + beta = (gamma W) x + (gamma b + beta)."""
        con, affine = self.take("con"), self.take("affine")
        weight, bias = con.arrays["weight"].astype(np.float64), con.arrays["bias"].astype(np.float64)
        gamma, beta = affine.arrays["gamma"].astype(np.float64), affine.arrays["beta"]
        if weight.shape[1] != shape[0] or gamma.size != weight.shape[0]:
            raise DatFormatError(f"conv {weight.shape} does not fit its input {shape}")
        (sy, sx), (py, px) = con.ints["stride"], con.ints["pad"]
        kh, kw = weight.shape[2:]
        out = self.node("Conv", [x, self.const((weight * gamma[:, None, None, None]).astype(np.float32), "w"),
                                 self.const((bias * gamma + beta).astype(np.float32), "b")],
                        kernel_shape=[kh, kw], strides=[sy, sx], pads=[py, px, py, px])
        h = (shape[1] + 2 * py - kh) // sy + 1
        w = (shape[2] + 2 * px - kw) // sx + 1
        return out, (weight.shape[0], h, w)

    def relu(self, x: str, output: str | None = None) -> str:
        self.take("relu")
        return self.node("Relu", [x], output)

    def pool(self, op: str, kind: str, x: str, shape):
        layer = self.take(kind)
        (kh, kw), (sy, sx), (py, px) = layer.ints["size"], layer.ints["stride"], layer.ints["pad"]
        out = self.node(op, [x], kernel_shape=[kh, kw], strides=[sy, sx], pads=[py, px, py, px])
        return out, (shape[0], (shape[1] + 2 * py - kh) // sy + 1, (shape[2] + 2 * px - kw) // sx + 1)

    def pad_to(self, x: str, shape, target) -> str:
        if tuple(shape) == tuple(target):
            return x
        pads = [0, 0, 0, 0, 0] + [t - s for s, t in zip(shape, target)]
        return self.node("Pad", [x, self.const(np.array(pads, np.int64), "pads")], mode="constant")

    def residual(self, x: str, shape, down: bool, output: str | None = None):
        """relu(skip + block(x)) with dlib's add_prev: both zero-padded to the larger shape."""
        y, yshape = self.conv(x, shape)
        y = self.relu(y)
        y, yshape = self.conv(y, yshape)
        skip, sshape = (self.pool("AveragePool", "avg_pool", x, shape) if down else (x, shape))
        self.take("add_prev")
        target = tuple(max(a, b) for a, b in zip(sshape, yshape))
        added = self.node("Add", [self.pad_to(skip, sshape, target), self.pad_to(y, yshape, target)])
        return self.relu(added, output), target

    def band_view(self, maps: dict[int, tuple[str, tuple]], band: tuple[int, int], output: str):
        parts = []
        for level in VIEW_LEVELS:
            x, (_, rows, _) = maps[level]
            start, end = band_rows(band, rows)
            rows_in = self.node("Slice", [x, self.const(np.array([start], np.int64)),
                                          self.const(np.array([end], np.int64)),
                                          self.const(np.array([2], np.int64))])
            parts.append(self.node("ReduceMean", [rows_in], axes=[2, 3], keepdims=0))
        return self.node("Concat", parts, output, axis=1)


def build_graph(net: DlibNet):
    """The ONNX model (onnx.ModelProto) of `net`; raises DatFormatError if it is not dlib's ResNet v1."""
    from onnx import TensorProto, checker, helper

    if net.versions != expected_versions():
        raise DatFormatError("the file's layer wrappers are not those of dlib's face ResNet v1")
    if net.size != (CHIP_SIZE, CHIP_SIZE):
        raise DatFormatError(f"input size {net.size}, expected {CHIP_SIZE}x{CHIP_SIZE}")
    b = _Builder(net.layers)
    x = b.node("Cast", ["chips"], to=TensorProto.FLOAT)
    # dlib's input_rgb_image_sized: (pixel - mean[channel]) / 256, channels first.
    x = b.node("Sub", [x, b.const(np.array(net.mean, np.float32).reshape(1, 1, 1, 3), "mean")])
    x = b.node("Mul", [x, b.const(np.array(1 / 256, np.float32), "scale")])
    x = b.node("Transpose", [x], perm=[0, 3, 1, 2])
    x, shape = b.conv(x, (3, CHIP_SIZE, CHIP_SIZE))
    x = b.relu(x)
    x, shape = b.pool("MaxPool", "max_pool", x, shape)
    maps = {}
    for index, (level, _, down) in enumerate(ARCHITECTURE):
        last = index + 1 == len(ARCHITECTURE) or ARCHITECTURE[index + 1][0] != level
        x, shape = b.residual(x, shape, down, f"level{level}" if last else None)
        if last:
            maps[level] = (x, shape)
    pool = b.take("avg_pool")
    if pool.ints["size"] != (0, 0):
        raise DatFormatError("the last pooling is not global")
    pooled = b.node("Flatten", [b.node("GlobalAveragePool", [x])], "pooled", axis=1)
    fc = b.take("fc")
    b.node("MatMul", [pooled, b.const(fc.arrays["weight"], "fc")], "descriptor")
    if b.next != len(net.layers):
        raise DatFormatError(f"{len(net.layers) - b.next} layers left over")
    views = [b.band_view(maps, band, name) for name, band in BANDS.items()]
    dims = {"descriptor": fc.arrays["weight"].shape[1], "pooled": shape[0]}
    dims.update({v: sum(maps[level][1][0] for level in VIEW_LEVELS) for v in views})
    graph = helper.make_graph(
        b.nodes, "dlib_face_recognition_resnet_model_v1",
        [helper.make_tensor_value_info("chips", TensorProto.UINT8, ["n", CHIP_SIZE, CHIP_SIZE, 3])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", dim]) for name, dim in dims.items()],
        b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="subdisc", producer_version=str(GRAPH_VERSION))
    model.ir_version = 8
    checker.check_model(model)
    return model
