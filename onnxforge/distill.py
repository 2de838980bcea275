"""Knowledge distillation: win back the accuracy that structured pruning lost.

``prune{granularity=channel}`` removes whole channels without retraining, and accuracy drops
(digits-cnn at half its channels: 0.997 -> about 0.20 held-out top-1). Distillation retrains
the pruned *student* to match the float *teacher* (Hinton, Vinyals and Dean, 2015)::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + (1 - alpha) * cross_entropy(student, labels)

The temperature ``T`` softens both distributions so that the teacher's ranking of the wrong
classes is learned too; ``T^2`` keeps the gradient scale of the KL term independent of ``T``.
Without labels the task term is dropped (``alpha`` is then 1).

Teacher and student may each be a ``torch.nn.Module``, a spec (``digits-cnn``,
``package.module:factory``, ``SPEC@weights.pt``; see :mod:`onnxforge.frontend.specs`), or an
ONNX model (an ``onnx_ir.Model`` or a ``.onnx`` path) converted back to a trainable module by
:func:`onnxforge.onnx_to_torch.onnx_to_torch` (its limits apply: the ops the samples use, no
fused or quantized ops — distil after ``prune`` and before ``fuse``). The first output of each
is taken as the logits, ``(batch, classes)``.

Training data is a sample's training split (``Sample.training_data``; digits: the bundled
1,437 training images, nothing is downloaded) or arrays given by the caller. The teacher is run
once over the data (no augmentation, so its logits never change). Training is seeded and
deterministic for a given thread count: the only randomness is the shuffling, drawn from its
own generator, and the global RNG and thread setting are restored afterwards. The trained
student is exported through the frontend (checked against PyTorch with ONNX Runtime); held-out
accuracy of the teacher and of the student before and after is measured when the sample has
labelled evaluation data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import pathlib
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from onnxforge.errors import InputError, first_line
from onnxforge.onnx_to_torch import onnx_to_torch

__all__ = [
    "DistillResult",
    "TrainingData",
    "distill",
    "distillation_loss",
    "load_module",
    "load_training_data",
    "top1_accuracy",
    "DISTILL_META_KEY",
    "LABELS_KEY",
    "DEFAULT_EPOCHS",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_ALPHA",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SEED",
    "DEFAULT_THREADS",
]

logger = logging.getLogger(__name__)

# The saved model's metadata key holding the distillation settings and sources (JSON).
DISTILL_META_KEY = "onnxforge.distill"
# In a training-data .npz, the array of class labels; every other array is a model input.
LABELS_KEY = "labels"

# Epochs, temperature, alpha and learning rate were chosen on a validation split carved out
# of digits' training data (never the held-out split): see docs/distill.md.
DEFAULT_EPOCHS = 30
# A high temperature lets a confident teacher's near-one-hot outputs still rank the classes.
DEFAULT_TEMPERATURE = 8.0
# Weight of the distillation term; the rest goes to the task (cross-entropy) loss.
DEFAULT_ALPHA = 0.9
DEFAULT_LEARNING_RATE = 1e-2
DEFAULT_BATCH_SIZE = 64
DEFAULT_SEED = 0
# Small models train no faster on more threads, and the machines are shared.
DEFAULT_THREADS = 1
# Batch size for the forward passes that compute teacher logits and accuracy.
_EVAL_BATCH = 256

ModelSource = nn.Module | ir.Model | str | os.PathLike


@dataclasses.dataclass
class TrainingData:
    """Model inputs keyed by input name (rows are examples) and optional class labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.inputs:
            raise InputError("the training data holds no input arrays")
        rows = {name: len(array) for name, array in self.inputs.items()}
        if self.labels is not None:
            rows[LABELS_KEY] = len(self.labels)
        if len(set(rows.values())) != 1:
            raise InputError(
                "the training arrays disagree on the number of examples: "
                + ", ".join(f"{name} {n}" for name, n in rows.items())
            )
        if next(iter(rows.values())) == 0:
            raise InputError("the training data holds no examples")

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))


@dataclasses.dataclass
class DistillResult:
    """The trained student (module and exported model), its losses and held-out accuracy."""

    module: nn.Module  # the trained student, in eval mode
    model: ir.Model | None  # the student exported through the frontend (None: not exported)
    losses: list[float]  # mean training loss per epoch
    teacher_accuracy: float | None  # held-out top-1, None without labelled evaluation data
    accuracy_before: float | None  # the student before training
    accuracy_after: float | None  # the exported student (ONNX Runtime), or the module
    settings: dict[str, Any]
    train_seconds: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures (no module, no model)."""
        return {
            "settings": self.settings,
            "losses": self.losses,
            "teacher_accuracy": self.teacher_accuracy,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "train_seconds": self.train_seconds,
        }


def _is_onnx_path(text: str) -> bool:
    return text.lower().endswith(".onnx")


def load_module(source: ModelSource) -> nn.Module:
    """A trainable module from a module, a spec, an ``onnx_ir.Model`` or a ``.onnx`` path."""
    if isinstance(source, nn.Module):
        return source
    if isinstance(source, ir.Model):
        return onnx_to_torch(source)
    text = os.fspath(source)
    if _is_onnx_path(text):
        from onnxforge.io import load

        return onnx_to_torch(load(text))
    from onnxforge.frontend.specs import resolve_spec

    resolved = resolve_spec(text)
    if resolved.program is not None:
        raise InputError(
            f"{text} is a torch.export archive, which cannot be trained",
            hint="give the student as a sample, package.module:factory, or an .onnx model",
        )
    return resolved.module


def load_training_data(path: str | os.PathLike[str]) -> TrainingData:
    """Training data from an ``.npz``: one array per model input, and ``labels`` if any."""
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise InputError(f"no such training data file: {path}") from None
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise InputError(f"{path} is not a readable .npz of arrays: {error}") from None
    labels = arrays.pop(LABELS_KEY, None)
    return TrainingData(arrays, None if labels is None else labels.astype(np.int64))


def _argument_names(module: nn.Module) -> list[str]:
    names = getattr(module, "input_names", None)
    if isinstance(names, list):
        return names
    return [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _ordered_inputs(module: nn.Module, inputs: Mapping[str, np.ndarray], role: str) -> list[str]:
    """The keys of ``inputs`` in the order ``module`` takes them."""
    if len(inputs) == 1:
        return list(inputs)
    names = _argument_names(module)
    if set(inputs) <= set(names) and names[: len(inputs)] == [n for n in names if n in inputs]:
        return names[: len(inputs)]
    raise InputError(
        f"the data's inputs ({', '.join(inputs)}) do not match the {role}'s ({', '.join(names)})",
        hint="name the arrays after the model's inputs",
    )


def _batches(
    data: Mapping[str, np.ndarray], order: Sequence[str], rows: np.ndarray | range, size: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    for start in range(0, len(rows), size):
        index = rows[start : start + size]
        yield tuple(torch.from_numpy(np.ascontiguousarray(data[name][index])) for name in order)


def _logits(output: Any) -> torch.Tensor:
    first = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(first, torch.Tensor) or first.dim() != 2:
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
        raise InputError(
            f"distillation needs (batch, classes) logits as the first output, got {shape}"
        )
    return first


def _predict(module: nn.Module, data: Mapping[str, np.ndarray], role: str) -> torch.Tensor:
    """The module's logits over all rows of ``data``, in eval mode, without gradients."""
    order = _ordered_inputs(module, data, role)
    was_training = module.training
    module.eval()
    rows = range(len(next(iter(data.values()))))
    try:
        with torch.no_grad():
            outputs = [_logits(module(*b)) for b in _batches(data, order, rows, _EVAL_BATCH)]
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"the {role} cannot run on the data: {first_line(error)}") from None
    finally:
        module.train(was_training)
    return torch.cat(outputs)


def top1_accuracy(module: nn.Module, inputs: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of ``module`` (eval mode) on ``inputs`` against ``labels``."""
    predicted = _predict(module, inputs, "model").argmax(dim=1).numpy()
    return float(np.mean(predicted == labels))


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``."""
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature * temperature)
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student, labels)


@contextlib.contextmanager
def _torch_settings(threads: int) -> Iterator[None]:
    """Set the thread count for the training; restore it, and the global RNG, afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(previous)


def _check_settings(**settings: Any) -> None:
    if settings["epochs"] < 1 or settings["batch_size"] < 1 or settings["threads"] < 1:
        raise InputError("epochs, batch size and threads must be at least 1")
    if settings["temperature"] <= 0 or settings["learning_rate"] <= 0:
        raise InputError("the temperature and the learning rate must be positive")
    if not 0.0 <= settings["alpha"] <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {settings['alpha']}")


def _sample_data(sample: str | None) -> tuple[TrainingData | None, TrainingData | None, Any]:
    """The sample's training and labelled evaluation data, and the sample itself."""
    if sample is None:
        return None, None, None
    from onnxforge.samples import get_sample

    spec = get_sample(sample)
    if spec.training_data is None:
        raise InputError(
            f"the sample '{sample}' has no training data",
            hint="pass the data as arrays (an .npz: one array per input, and 'labels')",
        )
    training = TrainingData(*spec.training_data())
    evaluation = None
    if spec.evaluation_data is not None and spec.metric == "top1":
        inputs, labels = spec.evaluation_data()
        if labels is not None:
            evaluation = TrainingData(inputs, labels)
    return training, evaluation, spec


def _source_name(source: ModelSource) -> str:
    if isinstance(source, nn.Module):
        return type(source).__name__
    if isinstance(source, ir.Model):
        return source.graph.name or "onnx model"
    return os.fspath(source)


def _source_pipeline(source: ModelSource) -> str | None:
    from onnxforge.io import PIPELINE_KEY

    if isinstance(source, ir.Model):
        return source.metadata_props.get(PIPELINE_KEY)
    if not isinstance(source, nn.Module) and _is_onnx_path(os.fspath(source)):
        import onnx

        proto = onnx.load(os.fspath(source), load_external_data=False)
        return {p.key: p.value for p in proto.metadata_props}.get(PIPELINE_KEY)
    return None


def distill(
    teacher: ModelSource,
    student: ModelSource,
    *,
    sample: str | None = None,
    data: TrainingData | None = None,
    evaluation: TrainingData | None = None,
    epochs: int = DEFAULT_EPOCHS,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = DEFAULT_SEED,
    threads: int = DEFAULT_THREADS,
    export: bool = True,
    on_progress: Callable[[int, int, float], None] | None = None,
) -> DistillResult:
    """Train ``student`` to match ``teacher`` on a sample's (or the given) training data.

    ``sample`` names a bundled sample whose training split is the data and whose labelled
    held-out split measures accuracy; ``data`` and ``evaluation`` give them directly instead.
    Adam at ``learning_rate`` with a cosine schedule over ``epochs``, mini-batches of
    ``batch_size`` shuffled by a generator seeded with ``seed``, ``threads`` torch threads.
    ``on_progress(step, total_steps, loss)`` is called after every optimizer step. With
    ``export`` the trained student is exported through :func:`onnxforge.frontend.export`
    (checked against PyTorch) and its accuracy measured with ONNX Runtime.
    """
    settings = {
        "epochs": epochs,
        "temperature": temperature,
        "alpha": alpha,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "seed": seed,
        "threads": threads,
    }
    _check_settings(**settings)
    sample_training, sample_evaluation, sample_spec = _sample_data(sample)
    data = data if data is not None else sample_training
    evaluation = evaluation if evaluation is not None else sample_evaluation
    if data is None:
        raise InputError(
            "distillation needs training data",
            hint="name a sample whose training split to use, or pass the data as arrays",
        )
    if data.labels is None and alpha < 1.0:
        logger.info("the training data has no labels: the loss is the distillation term alone")
    with _torch_settings(threads):  # building a module from a spec draws from the RNG too
        teacher_module = load_module(teacher)
        student_module = load_module(student)
        teacher_logits = _predict(teacher_module, data.inputs, "teacher")
        student_logits = _predict(student_module, data.inputs, "student")
        if student_logits.shape[1] != teacher_logits.shape[1]:
            raise InputError(
                f"the teacher has {teacher_logits.shape[1]} classes, the student "
                f"{student_logits.shape[1]}"
            )
        teacher_accuracy = before = None
        if evaluation is not None and evaluation.labels is not None:
            teacher_accuracy = top1_accuracy(teacher_module, evaluation.inputs, evaluation.labels)
            before = top1_accuracy(student_module, evaluation.inputs, evaluation.labels)
        start = time.perf_counter()
        losses = _train(
            student_module,
            data,
            teacher_logits,
            settings,
            on_progress=on_progress,
        )
        train_seconds = time.perf_counter() - start
        student_module.eval()
        model = None
        after = None
        if export:
            model = _export(student_module, data, sample_spec)
        if evaluation is not None and evaluation.labels is not None:
            after = (
                _onnx_accuracy(model, evaluation)
                if model is not None
                else top1_accuracy(student_module, evaluation.inputs, evaluation.labels)
            )
    settings = {
        **settings,
        "teacher": _source_name(teacher),
        "student": _source_name(student),
        "student_pipeline": _source_pipeline(student),
        "sample": sample,
        "examples": len(data),
    }
    if model is not None:
        model.metadata_props[DISTILL_META_KEY] = json.dumps(settings, sort_keys=True)
    logger.info(
        "distilled %s from %s in %.1f s: held-out top-1 %s -> %s (teacher %s)",
        settings["student"],
        settings["teacher"],
        train_seconds,
        before,
        after,
        teacher_accuracy,
    )
    return DistillResult(
        student_module, model, losses, teacher_accuracy, before, after, settings, train_seconds
    )


def _train(
    student: nn.Module,
    data: TrainingData,
    teacher_logits: torch.Tensor,
    settings: Mapping[str, Any],
    *,
    on_progress: Callable[[int, int, float], None] | None,
) -> list[float]:
    """The training loop; returns the mean loss of each epoch."""
    order = _ordered_inputs(student, data.inputs, "student")
    labels = torch.from_numpy(data.labels.astype(np.int64)) if data.labels is not None else None
    parameters = [p for p in student.parameters() if p.requires_grad]
    if not parameters:
        raise InputError("the student has no trainable parameters")
    epochs, batch_size = settings["epochs"], settings["batch_size"]
    optimizer = torch.optim.Adam(parameters, lr=settings["learning_rate"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    generator = torch.Generator().manual_seed(settings["seed"])
    steps_per_epoch = -(-len(data) // batch_size)
    total, step = epochs * steps_per_epoch, 0
    losses = []
    for _ in range(epochs):
        student.train()
        rows = torch.randperm(len(data), generator=generator).numpy()
        epoch_loss = 0.0
        for start, batch in zip(
            range(0, len(rows), batch_size),
            _batches(data.inputs, order, rows, batch_size),
            strict=True,
        ):
            index = torch.from_numpy(rows[start : start + batch_size])
            optimizer.zero_grad()
            loss = distillation_loss(
                _logits(student(*batch)),
                teacher_logits[index],
                labels[index] if labels is not None else None,
                temperature=settings["temperature"],
                alpha=settings["alpha"],
            )
            loss.backward()
            optimizer.step()
            epoch_loss += float(loss.detach()) * len(index)
            step += 1
            if on_progress is not None:
                on_progress(step, total, float(loss.detach()))
        schedule.step()
        losses.append(epoch_loss / len(data))
    student.eval()
    return losses


def _export(module: nn.Module, data: TrainingData, sample_spec: Any) -> ir.Model:
    from onnxforge.frontend import export

    order = _ordered_inputs(module, data.inputs, "student")
    example = tuple(torch.from_numpy(np.ascontiguousarray(data.inputs[n][:2])) for n in order)
    axes = None
    if sample_spec is not None and sample_spec.dynamic_axes:
        names = set(_argument_names(module))
        axes = {k: v for k, v in sample_spec.dynamic_axes.items() if k in names} or None
    tolerance = sample_spec.export_tolerance if sample_spec is not None else None
    return export(module, example, dynamic_axes=axes, tolerance=tolerance)


def _onnx_accuracy(model: ir.Model, evaluation: TrainingData) -> float:
    from onnxforge.backend import Session

    session = Session(model)
    if len(evaluation.inputs) == 1 and len(session.input_names) == 1:
        feed = {session.input_names[0]: next(iter(evaluation.inputs.values()))}
    else:
        feed = {name: evaluation.inputs[name] for name in session.input_names}
    logits = session.run(feed)[0]
    return float(np.mean(np.argmax(logits, axis=1) == evaluation.labels))
