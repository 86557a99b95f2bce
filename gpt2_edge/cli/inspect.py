"""``gpt2-edge inspect``: a bundle's manifest, summarised (or printed whole with ``--json``)."""

from __future__ import annotations

import argparse
import json

from ..runtime.bundle import Bundle


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``inspect``."""
    p = sub.add_parser("inspect", help="summarise a bundle")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true", help="print bundle.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    b = Bundle.load(args.bundle)
    m = b.manifest
    if args.json:
        print(json.dumps(m.to_dict(), indent=2))
        return 0
    d = b.dims
    print(f"bundle {b.path}  (schema {m.schema_version}, target {b.target}, precision {b.precision})")
    print(
        f"model  {d.n_layer} layers, {d.n_embd} wide, {d.n_head} heads x {d.head_size}, "
        f"vocab {d.vocab_size}, context {d.n_positions}"
    )
    total = sum(f.bytes for f in m.files.values())
    print(f"files  ({total / 2**20:.1f} MiB)")
    for name, f in m.files.items():
        print(f"  {name:<22} {f.bytes / 2**20:>9.2f} MiB  sha256 {f.sha256[:16]}")
    print("inputs")
    for s in b.inputs[:5]:
        print(f"  {s.name:<28} {s.dtype:<8} {list(s.shape)}")
    if len(b.inputs) > 5:
        more = sorted({s.name.split(".")[0] + ".*" for s in b.inputs[5:] if "." in s.name})
        print(f"  ... {len(b.inputs) - 5} more {', '.join(more)}")
    print("outputs")
    for s in b.outputs[:3]:
        print(f"  {s.name:<28} {s.dtype:<8} {list(s.shape)}")
    if len(b.outputs) > 3:
        print(f"  ... {len(b.outputs) - 3} more present.*")
    g = m.graph
    if g:
        census = ", ".join(f"{k} {v}" for k, v in list(g["op_census"].items())[:12])
        print(f"ops    {census}{' ...' if len(g['op_census']) > 12 else ''}")
        print(f"fused  {g.get('fused_ops') or 'none'}")
    v = m.validation
    if v:
        print(
            f"parity ({v['tolerance']}): max |dlogits| {v['max_abs_logits']:.2e}, max |dpresent| "
            f"{v['max_abs_present']:.2e}, top-1 {100 * v['top1_agreement']:.2f}%, greedy identical "
            f"{v['greedy_identical']}, {v['positions_compared']} positions, passed {v['passed']}"
        )
    if m.lora:
        lo = m.lora
        print(
            f"lora   {lo.name}: rank {lo.rank}, alpha {lo.alpha:g}{', rslora' if lo.use_rslora else ''}, "
            f"{', '.join(lo.target_modules)}; "
            + ", ".join(f"{f} sha256 {h[:16]}" for f, h in lo.files.items())
        )
    if m.lora_slots:
        ls = m.lora_slots
        print(f"lora   run time: {ls.slots} slots of rank <= {ls.rank} ({', '.join(ls.targets)})")
    if m.accuracy:
        print(f"accuracy {m.accuracy}")
    made = m.made_by
    print(f"made   {made.exporter} opset {made.opset}; {made.graph}")
    print("with   " + ", ".join(f"{k} {v}" for k, v in m.producers.items()))
    print(f"gen    eos {m.generation.eos_token_id}, context {m.generation.context_length}")
    return 0
