"""ONNX Runtime sessions on the CPU or CUDA execution provider."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxforge.errors import InputError, first_line
from onnxforge.passes.base import CUDA_PROVIDER_OPTIONS_KEY

__all__ = [
    "Session",
    "BoundRun",
    "EP_PROVIDERS",
    "GRAPH_OPTIMIZATION_LEVELS",
    "available_eps",
    "model_cuda_options",
]

EP_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
GRAPH_OPTIMIZATION_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available_eps() -> list[str]:
    """The execution providers this onnxruntime build offers, by our short names."""
    installed = ort.get_available_providers()
    return [name for name, provider in EP_PROVIDERS.items() if provider in installed]


def _resolve_providers(ep: str) -> list[str]:
    installed = ort.get_available_providers()
    if ep == "auto":
        ep = "cuda" if EP_PROVIDERS["cuda"] in installed else "cpu"
    if ep not in EP_PROVIDERS:
        raise InputError(f"unknown execution provider '{ep}'", hint="use cpu, cuda or auto")
    if EP_PROVIDERS[ep] not in installed:
        raise InputError(
            f"execution provider '{ep}' is not available in this onnxruntime "
            f"{ort.__version__} (installed: {', '.join(installed)})",
            hint="install onnxforge[cuda] (onnxruntime-gpu) in place of onnxruntime",
        )
    providers = [EP_PROVIDERS[ep]]
    return providers if ep == "cpu" else [*providers, EP_PROVIDERS["cpu"]]


def model_cuda_options(model_or_path: ir.Model | str | os.PathLike[str]) -> dict[str, str]:
    """The CUDA provider options a pass recorded in the model's metadata (empty when none).

    ``fp16{target=cuda}`` records them for float16 convolutions; a file is read without its
    external weights. An unreadable file or malformed entry gives no options (ONNX Runtime then
    reports what is wrong with the file).
    """
    try:
        if isinstance(model_or_path, ir.Model):
            text = model_or_path.metadata_props.get(CUDA_PROVIDER_OPTIONS_KEY)
        else:
            proto = onnx.load(os.fspath(model_or_path), load_external_data=False)
            text = {p.key: p.value for p in proto.metadata_props}.get(CUDA_PROVIDER_OPTIONS_KEY)
        options = json.loads(text) if text else {}
    except Exception as error:  # unreadable: the session's own load says why
        logging.getLogger(__name__).debug("no CUDA options from the model: %s", error)
        return {}
    if not isinstance(options, dict):
        return {}
    return {str(key): str(value) for key, value in options.items()}


def _has_external_tensors(model: ir.Model) -> bool:
    return any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    )


class Session:
    """An ONNX Runtime inference session over an ``onnx_ir.Model`` or a model file.

    On CUDA, the provider options a pass recorded in the model (:func:`model_cuda_options`)
    apply first and ``provider_options`` override them; ``provider_options`` attribute: what
    the provider was given.
    """

    def __init__(
        self,
        model_or_path: ir.Model | str | os.PathLike[str],
        *,
        ep: Literal["cpu", "cuda", "auto"] = "cpu",
        threads: int | None = None,
        graph_optimization: Literal["none", "basic", "extended", "all"] = "all",
        provider_options: Mapping[str, Any] | None = None,
        cuda_graph: bool = False,
    ) -> None:
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.threads = threads  # intra-op threads; None: ONNX Runtime's default (all cores)
        if graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise InputError(
                f"unknown graph optimization level '{graph_optimization}'",
                hint=f"use one of {', '.join(GRAPH_OPTIMIZATION_LEVELS)}",
            )
        options.graph_optimization_level = GRAPH_OPTIMIZATION_LEVELS[graph_optimization]
        options.log_severity_level = 3  # errors only: warnings go through our own reporting
        providers = _resolve_providers(ep)
        self.ep = "cuda" if providers[0] == EP_PROVIDERS["cuda"] else "cpu"
        # the model's recorded CUDA options first, the caller's on top of them
        first_options = model_cuda_options(model_or_path) if self.ep == "cuda" else {}
        first_options.update(provider_options or {})
        if cuda_graph:
            if self.ep != "cuda":
                raise InputError(
                    "CUDA graphs need the cuda execution provider",
                    hint="use ep='cuda', or drop cuda_graph",
                )
            # Replays the captured kernels; needs static shapes and inputs bound with bind().
            first_options["enable_cuda_graph"] = "1"
        self.cuda_graph = cuda_graph
        self.provider_options = first_options  # what the first provider was given
        provider_opts = [first_options] + [{}] * (len(providers) - 1)
        try:
            if isinstance(model_or_path, ir.Model):
                self._session = self._from_model(model_or_path, options, providers, provider_opts)
            else:
                self._session = ort.InferenceSession(
                    os.fspath(model_or_path),
                    options,
                    providers=providers,
                    provider_options=provider_opts,
                )
        except Exception as error:  # ORT raises its own exception types
            reason = first_line(error)
            raise InputError(f"ONNX Runtime cannot load the model: {reason}") from error
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        # Initializers that are also graph inputs: a caller may feed them to override them.
        self.overridable_names = [i.name for i in self._session.get_overridable_initializers()]

    @staticmethod
    def _from_model(model: ir.Model, options, providers, provider_opts) -> ort.InferenceSession:
        if not _has_external_tensors(model):
            data = ir.to_proto(model).SerializeToString()
            return ort.InferenceSession(
                data, options, providers=providers, provider_options=provider_opts
            )
        # External tensors are read by ONNX Runtime from files next to the model.
        with tempfile.TemporaryDirectory(prefix="onnxforge-session-") as tmp:
            path = pathlib.Path(tmp) / "model.onnx"
            ir.save(model, path, external_data="model.data")
            return ort.InferenceSession(
                os.fspath(path), options, providers=providers, provider_options=provider_opts
            )

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Raise InputError naming the expected inputs when ``inputs`` do not match them."""
        missing = [name for name in self.input_names if name not in inputs]
        known = set(self.input_names) | set(self.overridable_names)
        unknown = [name for name in inputs if name not in known]
        if missing or unknown:
            raise InputError(
                f"inputs do not match the model: missing {missing or 'none'}, "
                f"unexpected {unknown or 'none'}",
                hint=f"the model takes: {', '.join(self.input_names)}",
            )

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once; returns the outputs in graph order."""
        self.check_inputs(inputs)
        feed = {name: np.asarray(value) for name, value in inputs.items()}
        try:
            return list(self._session.run(self.output_names, feed))
        except Exception as error:  # ORT's own types: a failed allocation, a kernel refusing
            reason = first_line(error)
            raise InputError(f"ONNX Runtime failed to run the model: {reason}") from error

    def bind(self, inputs: Mapping[str, np.ndarray]) -> BoundRun:
        """Bind ``inputs`` and the outputs to the session's device (IO binding).

        Repeated runs then move no data between host and device; see :class:`BoundRun`.
        """
        return BoundRun(self, inputs)

    @classmethod
    def runner(cls, *, ep: str = "cpu", threads: int | None = None):
        """A ``runner(model, inputs) -> outputs`` callable, as VerifyNumerics takes."""

        def run(model: ir.Model, inputs: Mapping[str, np.ndarray]) -> Sequence[np.ndarray]:
            return cls(model, ep=ep, threads=threads).run(inputs)

        return run


_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _declared_outputs(session: ort.InferenceSession) -> list[tuple[list[int], type]] | None:
    """Output shapes and dtypes when the model declares every dimension, else None."""
    declared = []
    for output in session.get_outputs():
        shape, dtype = output.shape, _ORT_DTYPES.get(output.type)
        if dtype is None or shape is None or not all(isinstance(d, int) for d in shape):
            return None
        declared.append((shape, dtype))
    return declared


class BoundRun:
    """A session with its inputs and outputs bound to the device: ``run()`` moves no data.

    Inputs are copied to the device once; outputs are allocated there once, so their addresses
    stay fixed, as CUDA graphs require. Their shapes come from the model when it declares them
    all (a CUDA-graph session must never run unbound: its first run is the capture), else from
    one ordinary run. ``run()`` waits for the device to finish, so wall-clock timing around it
    is honest. ``outputs()`` copies the latest outputs back to the host.
    """

    def __init__(self, session: Session, inputs: Mapping[str, np.ndarray]) -> None:
        session.check_inputs(inputs)
        shapes = _declared_outputs(session._session)
        if shapes is None:
            if session.cuda_graph:
                raise InputError(
                    "CUDA graphs need static output shapes, and this model has symbolic ones",
                    hint="export with --static (and fixed --input-shape), or drop cuda_graph",
                )
            shapes = [(r.shape, r.dtype) for r in session.run(inputs)]
        device = session.ep
        self._session = session._session
        self._binding = self._session.io_binding()
        self._inputs = {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0)
            for name, value in inputs.items()
        }
        for name, value in self._inputs.items():
            self._binding.bind_ortvalue_input(name, value)
        self._outputs = [
            ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, 0)
            for shape, dtype in shapes
        ]
        for name, value in zip(session.output_names, self._outputs, strict=True):
            self._binding.bind_ortvalue_output(name, value)
        self.batch = int(next(iter(inputs.values())).shape[0]) if inputs else 1

    def run(self) -> None:
        """Run once on the bound tensors and wait for the device."""
        self._session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()

    def outputs(self) -> list[np.ndarray]:
        """The outputs of the latest run, copied to the host."""
        return [value.numpy() for value in self._outputs]
