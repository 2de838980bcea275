"""Where calibration and evaluation data come from, streamed one batch at a time.

The ``data`` option of ``quantize`` names a source:

- ``sample:NAME``: a bundled sample's ``calibration_data()`` (batches) and ``evaluation_data()``
  (held-out inputs, and labels for classifiers), with the sample's metric;
- a folder: every ``*.npz`` file in it, in name order, one batch per file, arrays keyed by
  graph input name (an array called ``labels`` holds labels for the ``top1`` metric);
- one ``.npz`` file: a single batch, as above;
- ``random``, or nothing: seeded random inputs shaped from the graph inputs. Calibrating on
  them is a last resort (ranges of random activations are not those of real ones), so it logs
  a warning.

Every call of :meth:`DataSource.calibration` or :meth:`DataSource.evaluation` starts a new
stream; nothing holds more than one batch, so memory stays bounded on large sets. ONNX
Runtime's ``CalibrationDataReader`` is an iterator: :class:`StreamingReader` feeds it lazily.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import pathlib
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnxruntime.quantization import CalibrationDataReader

from onnxforge.errors import InputError

__all__ = [
    "Batch",
    "LabelledBatch",
    "InputInfo",
    "DataSource",
    "StreamingReader",
    "input_infos",
    "parse_data",
    "open_source",
    "random_batches",
    "chunks",
    "LABELS_KEY",
    "RANDOM_BATCHES",
    "RANDOM_BATCH_SIZE",
    "RANDOM_SEED",
    "RANDOM_DIM",
    "EVALUATION_BATCH",
]

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
LabelledBatch = tuple[Batch, "np.ndarray | None"]

# An array of this name in an .npz batch holds the labels of its rows.
LABELS_KEY = "labels"
# Seeded random data: this many batches of this many rows, symbolic non-batch dims of this size.
RANDOM_BATCHES = 8
RANDOM_BATCH_SIZE = 8
RANDOM_DIM = 16
RANDOM_SEED = 0
# Random evaluation batches use seeds after the calibration ones: never the same rows.
_EVALUATION_SEED_OFFSET = 1000
# A sample's evaluation inputs come as one set; they are run in batches of this many rows.
EVALUATION_BATCH = 16

_SAMPLE_PREFIX = "sample:"
_RANDOM = "random"


@dataclasses.dataclass(frozen=True)
class InputInfo:
    """A graph input: name, numpy dtype, and dims (ints, or None where symbolic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]


def input_infos(model: ir.Model) -> list[InputInfo]:
    """The graph inputs that are not initializers."""
    infos = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None:
            raise InputError(f"graph input '{value.name}' has no tensor type")
        dims = tuple(d if isinstance(d, int) else None for d in (value.shape or ()))
        infos.append(InputInfo(str(value.name), value.dtype.numpy(), dims))
    return infos


def parse_data(text: str) -> tuple[str, str]:
    """``(kind, target)`` from the option text: kind is none, sample, random or path.

    Only the spelling is checked here; whether the sample or path exists is checked when the
    pass runs, so that pipelines can be parsed and printed anywhere.
    """
    text = text.strip()
    if not text:
        return "none", ""
    if text == _RANDOM:
        return "random", ""
    if text.startswith(_SAMPLE_PREFIX):
        name = text[len(_SAMPLE_PREFIX) :].strip()
        if not name:
            raise ValueError("data=sample: needs a sample name, e.g. data=sample:digits-cnn")
        return "sample", name
    return "path", text


def random_batches(
    inputs: Sequence[InputInfo],
    *,
    batches: int = RANDOM_BATCHES,
    rows: int = RANDOM_BATCH_SIZE,
    seed: int = RANDOM_SEED,
) -> Iterator[Batch]:
    """Seeded random batches: floats standard normal, integers 0 or 1, masks all ones."""
    for index in range(batches):
        rng = np.random.default_rng(seed + index)
        batch = {}
        for info in inputs:
            shape = [
                dim if dim is not None else (rows if axis == 0 else RANDOM_DIM)
                for axis, dim in enumerate(info.dims)
            ]
            if "mask" in info.name.lower():
                batch[info.name] = np.ones(shape, dtype=info.dtype)
            elif np.issubdtype(info.dtype, np.floating):
                batch[info.name] = rng.standard_normal(shape).astype(info.dtype)
            elif np.issubdtype(info.dtype, np.integer) or info.dtype == np.bool_:
                batch[info.name] = rng.integers(0, 2, size=shape).astype(info.dtype)
            else:
                raise InputError(
                    f"cannot make random data of dtype {info.dtype} for input '{info.name}'",
                    hint="give real data: quantize{data=DIR} with .npz batches",
                )
        yield batch


def _read_npz(path: pathlib.Path) -> Batch:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(f"cannot read calibration batch {path}: {error}") from None


def _row_batches(
    inputs: Mapping[str, np.ndarray], labels: np.ndarray | None, rows: int
) -> Iterator[LabelledBatch]:
    total = len(next(iter(inputs.values())))
    for start in range(0, total, rows):
        batch = {name: array[start : start + rows] for name, array in inputs.items()}
        yield batch, None if labels is None else labels[start : start + rows]


@dataclasses.dataclass
class DataSource:
    """Calibration batches and labelled evaluation batches; each call is a new stream."""

    description: str
    make_calibration: Callable[[], Iterable[Batch]]
    make_evaluation: Callable[[], Iterable[LabelledBatch]]
    metric: str | None = None  # the metric the data's owner (a sample) asks for
    random: bool = False
    input_names: tuple[str, ...] = ()

    def _checked(self, batch: Mapping[str, np.ndarray], where: str) -> Batch:
        missing = [name for name in self.input_names if name not in batch]
        if missing:
            raise InputError(
                f"{where} from {self.description} lacks input(s) {', '.join(missing)}",
                hint=f"each batch must hold an array for every graph input: "
                f"{', '.join(self.input_names)}",
            )
        return {name: np.asarray(batch[name]) for name in self.input_names}

    def calibration(self) -> Iterator[Batch]:
        """The calibration batches, keyed by graph input name."""
        for batch in self.make_calibration():
            yield self._checked(batch, "a calibration batch")

    def evaluation(self) -> Iterator[LabelledBatch]:
        """The evaluation batches with their labels (None when there are none)."""
        for batch, labels in self.make_evaluation():
            yield self._checked(batch, "an evaluation batch"), labels


def _sample_source(name: str, names: tuple[str, ...]) -> DataSource:
    from onnxforge.samples import get_sample  # imports torch: only when a sample is asked for

    sample = get_sample(name)
    if sample.calibration_data is None:
        raise InputError(
            f"sample '{name}' has no calibration data",
            hint="give a folder of .npz batches instead: quantize{data=DIR}",
        )

    def evaluation() -> Iterator[LabelledBatch]:
        if sample.evaluation_data is None:  # held out from nothing: use the calibration set
            yield from ((batch, None) for batch in sample.calibration_data())
            return
        inputs, labels = sample.evaluation_data()
        yield from _row_batches(inputs, labels, EVALUATION_BATCH)

    return DataSource(
        f"sample '{name}'",
        sample.calibration_data,
        evaluation,
        metric=sample.metric,
        input_names=names,
    )


def _path_source(text: str, names: tuple[str, ...]) -> DataSource:
    path = pathlib.Path(text)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise InputError(f"no .npz files in data folder {path}")
        description = f"{len(files)} .npz file(s) in {path}"
    elif path.is_file():
        files = [path]
        description = str(path)
    else:
        raise InputError(
            f"data={text}: no such file or folder",
            hint="data takes sample:NAME, a folder of .npz batches, one .npz file, or random",
        )

    def calibration() -> Iterator[Batch]:
        for file in files:
            yield _read_npz(file)

    def evaluation() -> Iterator[LabelledBatch]:
        for file in files:
            batch = _read_npz(file)
            yield batch, batch.get(LABELS_KEY)

    return DataSource(description, calibration, evaluation, input_names=names)


def _random_source(inputs: Sequence[InputInfo]) -> DataSource:
    names = tuple(info.name for info in inputs)
    return DataSource(
        f"seeded random inputs ({RANDOM_BATCHES} batches of {RANDOM_BATCH_SIZE})",
        lambda: random_batches(inputs),
        lambda: ((b, None) for b in random_batches(inputs, seed=_EVALUATION_SEED_OFFSET)),
        random=True,
        input_names=names,
    )


def open_source(text: str, inputs: Sequence[InputInfo]) -> DataSource:
    """The data source named by ``text`` for a model with these graph inputs."""
    kind, target = parse_data(text)
    names = tuple(info.name for info in inputs)
    if kind == "sample":
        return _sample_source(target, names)
    if kind == "path":
        return _path_source(target, names)
    return _random_source(inputs)


def chunks(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive lists of at most ``size`` batches, read lazily."""
    iterator = iter(batches)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class StreamingReader(CalibrationDataReader):
    """ONNX Runtime's calibration reader over an iterator: one batch read per ``get_next``."""

    def __init__(self, batches: Iterable[Batch]) -> None:
        self._iterator = iter(batches)
        self.batches_read = 0

    def get_next(self) -> Batch | None:
        """The next batch, or None at the end."""
        batch = next(self._iterator, None)
        if batch is not None:
            self.batches_read += 1
        return batch
