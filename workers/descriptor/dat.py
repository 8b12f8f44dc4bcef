"""A plain-Python reader of dlib's descriptor network file (dlib_face_recognition_resnet_model_v1.dat).

    >>> net = read_dat(model_paths()["resnet"])
    >>> net.mean, [layer.kind for layer in net.layers][:4]
    ((122.782, 117.001, 104.298), ['con', 'affine', 'relu', 'max_pool'])

The layout (dlib/serialize.h, dlib/cuda/tensor.h, dlib/dnn/layers.h) is described in
../shared/docs/dlib-descriptor-format.md: a loss layer, one version int per layer wrapper (outermost
first), the input layer, then every layer with data from the input to the output. Tag and skip
wrappers carry no data; where they sit comes from the network definition (see graph.py). The reader
checks every field it skips and refuses a file it does not consume to the last byte.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np


class DatFormatError(ValueError):
    """The file is not the dlib network this reader knows."""


@dataclass
class Layer:
    """One layer with data, as dlib stored it.

    kind: "con", "affine", "relu", "max_pool", "avg_pool", "add_prev" or "fc".
    con: weight (F, C, kh, kw) float32 OIHW, bias (F,), stride (y, x), pad (y, x).
    affine: gamma (C,), beta (C,)  (y = gamma * x + beta per channel).
    max_pool / avg_pool: size (nr, nc) (0, 0 = global), stride, pad.
    fc: weight (num_inputs, num_outputs), y = x @ weight, no bias.
    """

    kind: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    ints: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class DlibNet:
    """The network of the file: input mean and size, loss parameters, and its layers in order."""

    mean: tuple[float, float, float]
    size: tuple[int, int]
    versions: list[int]
    layers: list[Layer]
    loss: dict[str, float]


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DatFormatError(f"file ends at byte {len(self.data)}, needed {n} more at {self.pos}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        (control,) = self.take(1)
        n = control & 0x0F
        if not 1 <= n <= 8 or control & 0x70:
            raise DatFormatError(f"bad int control byte {control:#04x} at {self.pos - 1}")
        value = int.from_bytes(self.take(n), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        special = {32000: float("inf"), 32001: float("-inf"), 32002: float("nan")}
        return special[exponent] if exponent in special else float(mantissa) * 2.0 ** exponent

    def bool(self) -> bool:
        byte = self.take(1)
        if byte not in (b"0", b"1"):
            raise DatFormatError(f"bad bool {byte!r} at {self.pos - 1}")
        return byte == b"1"

    def string(self) -> str:
        return self.take(self.int()).decode("ascii")

    def expect_string(self, *names: str) -> str:
        at = self.pos
        name = self.string()
        if name not in names:
            raise DatFormatError(f"expected {' or '.join(names)} at byte {at}, found {name!r}")
        return name

    def tensor(self) -> np.ndarray:
        """A tensor: version 2, n, k, nr, nc, then little-endian float32 data."""
        if (version := self.int()) != 2:
            raise DatFormatError(f"tensor version {version} at {self.pos}")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        return np.frombuffer(self.take(4 * count), "<f4").astype(np.float32).reshape(shape)

    def empty_tensor(self) -> None:
        if self.tensor().size:
            raise DatFormatError(f"expected an empty tensor before byte {self.pos}")

    def alias(self) -> tuple[int, ...]:
        if (version := self.int()) != 1:
            raise DatFormatError(f"alias_tensor version {version} at {self.pos}")
        return tuple(self.int() for _ in range(4))


def _con(r: _Reader) -> Layer:
    params = r.tensor().ravel()
    filters, nr, nc, sy, sx, py, px = (r.int() for _ in range(7))
    weights_shape, bias_shape = r.alias(), r.alias()
    for _ in range(4):
        r.float()   # learning-rate and weight-decay multipliers: training only
    channels = weights_shape[1]
    n_weights = filters * channels * nr * nc
    if weights_shape != (filters, channels, nr, nc) or bias_shape != (1, filters, 1, 1) \
            or params.size != n_weights + filters:
        raise DatFormatError(f"con_4 shapes disagree: {weights_shape} {bias_shape} {params.size}")
    return Layer("con", {"weight": params[:n_weights].reshape(weights_shape),
                         "bias": params[n_weights:].copy()},
                 {"stride": (sy, sx), "pad": (py, px)})


def _affine(r: _Reader) -> Layer:
    params = r.tensor().ravel()
    gamma_shape, beta_shape = r.alias(), r.alias()
    if (mode := r.int()) != 0:
        raise DatFormatError(f"affine mode {mode} (only per-channel, 0, is known)")
    channels = gamma_shape[1]
    if gamma_shape != beta_shape or params.size != 2 * channels:
        raise DatFormatError(f"affine shapes disagree: {gamma_shape} {beta_shape} {params.size}")
    return Layer("affine", {"gamma": params[:channels].copy(), "beta": params[channels:].copy()})


def _pool(kind: str):
    def read(r: _Reader) -> Layer:
        nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
        return Layer(kind, {}, {"size": (nr, nc), "stride": (sy, sx), "pad": (py, px)})
    return read


def _fc(r: _Reader) -> Layer:
    outputs, inputs = r.int(), r.int()
    params = r.tensor()
    r.alias(), r.alias()
    if (bias_mode := r.int()) != 1:
        raise DatFormatError(f"fc bias mode {bias_mode} (only 1, no bias, is known)")
    for _ in range(4):
        r.float()
    if params.size != inputs * outputs:
        raise DatFormatError(f"fc has {params.size} parameters for {inputs} x {outputs}")
    return Layer("fc", {"weight": params.reshape(inputs, outputs)})


_DETAILS = {
    "con_4": _con, "affine_": _affine, "max_pool_2": _pool("max_pool"),
    "avg_pool_2": _pool("avg_pool"), "fc_2": _fc,
    "relu_": lambda r: Layer("relu"), "add_prev_": lambda r: Layer("add_prev"),
}


def read_dat(path: str) -> DlibNet:
    """Parse the file at `path`. Raises DatFormatError unless every byte is accounted for."""
    with open(path, "rb") as f:
        r = _Reader(f.read())
    if (version := r.int()) != 1:
        raise DatFormatError(f"loss layer version {version}")
    r.expect_string("loss_metric_2")
    loss = {"margin": r.float(), "distance_threshold": r.float()}
    versions = []
    while not versions or versions[-1] != 3:   # 3: the layer that sits on the input layer
        versions.append(r.int())
        if versions[-1] not in (1, 2, 3) or len(versions) > 10_000:
            raise DatFormatError(f"unexpected layer version {versions[-1]} at byte {r.pos}")
    r.expect_string("input_rgb_image_sized")
    mean = (r.float(), r.float(), r.float())
    size = (r.int(), r.int())
    layers = []
    for index, version in enumerate(v for v in reversed(versions) if v != 1):
        name = r.expect_string(*_DETAILS)
        layers.append(_DETAILS[name](r))
        for _ in range(3):
            r.bool()       # this_layer_setup_called, gradient_input_is_stale, output disabled
        r.empty_tensor()   # x_grad
        r.empty_tensor()   # cached_output
        if version == 2:
            r.empty_tensor()   # params_grad
        else:
            if index != 0:
                raise DatFormatError("a version-3 layer that is not the first")
            r.empty_tensor()   # grad_final
            if (factor := r.int()) != 1:
                raise DatFormatError(f"sample_expansion_factor {factor}")
    if r.pos != len(r.data):
        raise DatFormatError(f"{len(r.data) - r.pos} bytes left unread at byte {r.pos}")
    return DlibNet(mean, size, versions, layers, loss)
