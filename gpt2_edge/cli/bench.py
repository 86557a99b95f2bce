"""``gpt2-edge bench``: time to first token, decode speed and peak memory of bundles, here.

The measuring is ``gpt2_edge/bench.py``; this module reads the flags and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ..bench import BATCH, BenchConfig, bench, plot, require_pyplot, table
from ..errors import Gpt2EdgeError
from ..runtime.backends import PROVIDERS


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench``."""
    p = sub.add_parser("bench", help="time to first token, decode speed and peak memory per bundle, here")
    p.add_argument("bundles", nargs="+", help="bundle directories to compare")
    p.add_argument("--threads", type=int, help="CPU threads (default: onnxruntime's choice)")
    p.add_argument("--provider", default="cpu", choices=PROVIDERS, help="as for generate (default: cpu)")
    p.add_argument("--rounds", type=int, default=1, help="alternate the bundles this many times; medians")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per measurement")
    p.add_argument("--short-prompt", type=int, default=32)
    p.add_argument("--long-prompt", type=int, default=512)
    p.add_argument("--long-context", type=int, default=896, help="prompt length of the long-context decode")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument(
        "--session-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an ONNX Runtime session config entry (repeatable), e.g. session.disable_prepacking=1",
    )
    p.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        metavar="N",
        help="also measure each bundle with speculative decoding by prompt lookup (up to N drafted "
        "tokens per step): one more row per bundle, with the share of drafted tokens accepted",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw a chart (needs the plot extra)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = BenchConfig(
        short_prompt=_positive("short-prompt", args.short_prompt),
        long_prompt=_positive("long-prompt", args.long_prompt),
        long_context=_positive("long-context", args.long_context),
        new_tokens=_positive("new-tokens", args.new_tokens),
        batch=_positive("batch", args.batch),
        threads=args.threads,
        provider=args.provider,
        session_config=_key_values(args.session_config),
        prompt_lookup=_non_negative("prompt-lookup", args.prompt_lookup),
    )
    if args.plot:
        require_pyplot()  # refuse before measuring, not after
    results = bench(
        args.bundles, cfg, _positive("rounds", args.rounds), log=lambda m: print(m, file=sys.stderr)
    )
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(table(results))
    if args.plot:
        plot(results, args.plot)
        print(f"chart written: {args.plot}", file=sys.stderr)
    return 0


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise Gpt2EdgeError(f"--{name} must be >= 1, got {value}")
    return value


def _non_negative(name: str, value: int) -> int:
    if value < 0:
        raise Gpt2EdgeError(f"--{name} must be >= 0, got {value}")
    return value


def _key_values(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Gpt2EdgeError(f"--session-config takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out
