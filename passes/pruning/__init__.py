"""The pieces of the ``prune`` pass (:mod:`onnxforge.passes.prune`), one module per job.

- :mod:`.static_values`: constants, small shape tensors and value shapes read without running
  the model;
- :mod:`.macs`: multiply-accumulate counts of Conv, ConvTranspose, Gemm and MatMul (and
  ONNX Runtime's fused forms of them);
- :mod:`.sparsify`: unstructured and N:M sparsity (weights zeroed in place);
- :mod:`.channel_graph`: which output channels are tied together across the graph, and what
  must change when one is removed (the analysis), recorded in a :mod:`.channel_plan`;
- :mod:`.reshape_rules`: where a Reshape or Flatten moves the channel axis;
- :mod:`.channel_rewrite`: removing the chosen channels (the rewrite);
- :mod:`.report`: the report a pruning run leaves on the pass instance.
"""

from __future__ import annotations

__all__: list[str] = []
