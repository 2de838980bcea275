"""The rewrite rules behind the ``fuse`` pass, one module per family of fusions.

Each module states the math of its rewrites and exposes a ``rules(target)`` function that
returns its onnxscript rewrite rules for an execution-provider target (``"cpu"`` or
``"cuda"``): a rule whose replacement has no kernel on that target is left out. Every
``check`` returns ``MatchResult().fail(reason)`` when it refuses a structural match, so that
``fuse``'s ``explain`` can say why a pattern did not fire.
"""

from __future__ import annotations
