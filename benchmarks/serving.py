"""Serving benchmark: dynamic batching against unbatched serving at the same concurrency.

For each model, closed-loop clients send single requests built from the sample's real data
(held-out digits; bundled sentences tokenised to 16 tokens for MiniLM), served three ways on
the same ONNX Runtime session: unbatched (the server with max_batch=1, a worker per client),
dynamically batched, and as direct calls from the client threads (no server: the floor of
per-request overhead). Medians over --repeats repetitions; prints one table of ratios.

    python benchmarks/serving.py [--concurrency 16] [--max-batch 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import onnxforge
from onnxforge.backend import Session, load_test
from onnxforge.samples import get_sample

# A 16-token sequence, as in the bar.
MINILM_TOKENS = 16


def _requests(name: str) -> dict:
    if name == "minilm":
        from onnxforge.samples.minilm import sentences, tokenize

        return tokenize(sentences(), sequence=MINILM_TOKENS)
    inputs, _ = get_sample(name).evaluation_data()
    return inputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits-cnn", "minilm"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--pipeline", default=None, help="optimise each export with this pipeline first (e.g. fuse)"
    )
    args = parser.parse_args()
    lines = [
        f"serving at concurrency {args.concurrency}, max batch {args.max_batch}, "
        f"timeout {args.batch_timeout_ms} ms; medians of {args.repeats} repeats",
        "",
        "| model | unbatched req/s | batched req/s | direct req/s | batched/unbatched | "
        "batched/direct | p99 ms unbatched | p99 ms batched | mean batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.models:
        model = onnxforge.export(name)
        if args.pipeline:
            model = onnxforge.optimize(model, args.pipeline).model
        session = Session(model)
        pool = _requests(name)
        per_client = 200 if name != "minilm" else 12
        results = [
            load_test(
                session,
                pool,
                concurrency=args.concurrency,
                max_batch=args.max_batch,
                batch_timeout_ms=args.batch_timeout_ms,
                requests_per_client=per_client,
            )
            for _ in range(args.repeats)
        ]

        def median(mode: str, field: str, results=results) -> float:
            return statistics.median(getattr(getattr(r, mode), field) for r in results)

        unbatched, batched = median("unbatched", "throughput"), median("batched", "throughput")
        direct = median("direct", "throughput")
        lines.append(
            f"| {name} | {unbatched:.0f} | {batched:.0f} | {direct:.0f} | "
            f"{batched / unbatched:.2f}x | {batched / direct:.2f}x | "
            f"{median('unbatched', 'p99_ms'):.2f} | {median('batched', 'p99_ms'):.2f} | "
            f"{median('batched', 'mean_batch'):.1f} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
