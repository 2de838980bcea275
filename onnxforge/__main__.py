"""``python -m onnxforge`` is the ``onnxforge`` command."""

from onnxforge.cli import main

main()
