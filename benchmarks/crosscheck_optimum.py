"""Our ONNX export against Hugging Face Optimum's (text-generation-with-past), same checkpoint.

Both graphs take the same input names, so one feed dict drives both sessions: a left-padded
batch prefill, then greedy decode steps feeding each graph's presents back as its past.

    python -m benchmarks.crosscheck_optimum [MODEL] [--json PATH]   (default: the shipped default model)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.harness import Column, Report, add_json_argument
from gpt2_edge.export.bundle import export_bundle
from gpt2_edge.model.checkpoint import load_checkpoint, resolve_model_dir
from gpt2_edge.runtime.generator import left_pad


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="checkpoint directory (default: the shipped default model)")
    add_json_argument(ap)
    args = ap.parse_args(argv)
    report = Report("crosscheck_optimum", "Our ONNX export against Optimum's", argv, vars(args))
    from optimum.exporters.onnx import main_export

    src = resolve_model_dir(args.model)
    c = load_checkpoint(src).config
    with tempfile.TemporaryDirectory() as d:
        main_export(
            str(src), output=Path(d) / "optimum", task="text-generation-with-past", no_post_process=True
        )
        ours_dir = export_bundle(src, Path(d) / "ours", target="tensorrt", log=lambda _: None)
        sess = {
            name: ort.InferenceSession(str(p / "model.onnx"), providers=["CPUExecutionProvider"])
            for name, p in (("optimum", Path(d) / "optimum"), ("ours", ours_dir))
        }
        names = [o.name for o in sess["ours"].get_outputs()]
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, c.vocab_size - 1, n).tolist() for n in (12, 30, 5)]
        ids, mask, pos = left_pad(prompts, c.eos_token_id)
        empty = np.zeros((3, c.n_head, 0, c.head_size), np.float32)
        past = {
            s: {f"past_key_values.{i}.{kv}": empty for i in range(c.n_layer) for kv in ("key", "value")}
            for s in sess
        }
        worst, agree, total = 0.0, 0, 0
        for _ in range(17):
            outs = {}
            for s, ses in sess.items():
                wanted = {i.name for i in ses.get_inputs()}
                feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past[s]}
                outs[s] = ses.run(names, {k: v for k, v in feeds.items() if k in wanted})
                past[s] = {
                    n.replace("present", "past_key_values"): v
                    for n, v in zip(names[1:], outs[s][1:], strict=True)
                }
            real = mask[:, -ids.shape[1] :].astype(bool)
            a, b = outs["ours"][0][real], outs["optimum"][0][real]
            worst = max(worst, float(np.abs(a - b).max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += len(a)
            ids = outs["ours"][0][:, -1].argmax(-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((3, 1), np.int64)], 1)
            pos = pos[:, -1:] + 1
    report.table(
        "ours vs optimum (text-generation-with-past), same feeds: a left-padded batch prefill + 16 greedy "
        "decode steps",
        [
            Column("model", "model"),
            Column("worst", "max |Δlogits|", ".2e"),
            Column("top1", "top-1 agreement"),
        ],
        [{"model": str(src), "worst": worst, "top1": f"{agree}/{total}"}],
    )
    report.emit(args.json)


if __name__ == "__main__":
    main()
