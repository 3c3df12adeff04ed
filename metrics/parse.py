"""Reading points out of bytes: `AICHOR_METRIC` lines, TensorBoard's record framing, scalar
summaries, and the min/max buckets charts are drawn from. No Django here."""

import math
import re
import struct

# numpy and TensorBoard's protobufs (~50 MiB) are imported on first use (_load): a web process
# that never shows a chart or reads an event file does not carry them.
np = event_pb2 = tensor_util = masked_crc32c = None


def _load() -> None:
    global np, event_pb2, tensor_util, masked_crc32c
    import numpy
    from tensorboard.compat.proto import event_pb2 as events
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as crc
    from tensorboard.util import tensor_util as tensors

    np, event_pb2, tensor_util, masked_crc32c = numpy, events, tensors, crc


MARKER = "AICHOR_METRIC"
_LINE = re.compile(r"AICHOR_METRIC[ \t]+([^\r\n]*)")
_PAIR = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_./:-]{0,254})=(\S+)")

Point = tuple[str, int | None, float]  # name, step (None: the next one), value


def metric_lines(text: str) -> list[Point]:
    """`AICHOR_METRIC loss=0.25 acc=0.9 step=3` gives two points at step 3; without `step=` each
    point takes its series' next step. Values that are not finite numbers are left out (JSON
    and the charts have no NaN)."""
    points: list[Point] = []
    for match in _LINE.finditer(text):
        pairs = dict(_PAIR.findall(match.group(1)))
        step = pairs.pop("step", None)
        try:
            step = int(step) if step is not None else None
        except ValueError:
            continue
        for name, raw in pairs.items():
            try:
                value = float(raw)
            except ValueError:
                continue
            if math.isfinite(value):
                points.append((name, step, value))
    return points


def records(data: bytes) -> tuple[list[bytes], int]:
    """The complete TFRecord payloads at the start of `data` and the bytes they take: a record
    still being written is left for the next read. A header whose checksum fails stops the read
    (a torn write), never misreads a length."""
    if masked_crc32c is None:
        _load()
    payloads, pos = [], 0
    while pos + 12 <= len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if masked_crc32c(header) != length_crc:
            break
        end = pos + 12 + length + 4
        if end > len(data):
            break
        payloads.append(data[pos + 12 : pos + 12 + length])
        pos = end
    return payloads, pos


def scalars(payload: bytes) -> list[Point]:
    """Scalar values of one Event: TF1-style `simple_value`, and the rank-0 numeric tensors the
    TF2 / tensorboard.summary writers use (images and text are tensors too, but not numeric
    scalars)."""
    if event_pb2 is None:
        _load()
    event = event_pb2.Event.FromString(payload)
    if not event.HasField("summary"):
        return []
    points: list[Point] = []
    for value in event.summary.value:
        if value.HasField("simple_value"):
            number = value.simple_value
        elif value.HasField("tensor"):
            try:
                array = tensor_util.make_ndarray(value.tensor)
            except (TypeError, ValueError):
                continue
            if array.size != 1 or array.dtype.kind not in "fiub":
                continue
            number = float(array.reshape(()))
        else:
            continue
        if math.isfinite(number):
            points.append((value.tag, event.step, float(number)))
    return points


def minmax(steps: list[int], values: list[float], size: int) -> tuple[list[int], list[float]]:
    """The smallest and the largest point of every `size` consecutive points, in their order: a
    spike survives downsampling, which an average would hide."""
    if size <= 1 or len(steps) <= 2:
        return list(steps), list(values)
    if np is None:
        _load()
    array = np.asarray(values, dtype=float)
    buckets = -(-len(array) // size)
    padded = np.full(buckets * size, np.inf)
    padded[: len(array)] = array
    starts = np.arange(buckets) * size
    lowest = padded.reshape(buckets, size).argmin(axis=1) + starts
    padded[len(array) :] = -np.inf
    highest = padded.reshape(buckets, size).argmax(axis=1) + starts
    keep = np.unique(np.concatenate([lowest, highest]))
    return np.asarray(steps)[keep].tolist(), array[keep].tolist()


def downsample(steps: list[int], values: list[float], max_points: int) -> tuple[list[int], list[float]]:
    if len(steps) <= max_points:
        return steps, values
    return minmax(steps, values, math.ceil(len(steps) / (max_points // 2)))
