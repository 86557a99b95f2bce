"""Cross-check: our ONNX export against Hugging Face Optimum's, same checkpoint, same feeds.

Optimum (task text-generation-with-past) uses the same input/output names as our contract, so
one feed dict drives both sessions.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpt2_edge import contract
from gpt2_edge.export.bundle import export_bundle
from gpt2_edge.runtime.generator import left_pad

pytest.importorskip("optimum.exporters.onnx")
ort = pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]


def _feeds(sess, ids, mask, pos, past):
    names = {i.name for i in sess.get_inputs()}
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}
    return {k: v for k, v in feeds.items() if k in names}


def test_logits_match_optimum_export(tmp_path, tiny_checkpoint):
    from optimum.exporters.onnx import main_export

    main_export(
        str(tiny_checkpoint),
        output=tmp_path / "optimum",
        task="text-generation-with-past",
        no_post_process=True,
    )
    ours_dir = export_bundle(tiny_checkpoint, tmp_path / "ours", target="tensorrt", log=lambda _: None)
    so = ort.SessionOptions()
    theirs = ort.InferenceSession(
        str(tmp_path / "optimum" / "model.onnx"), so, providers=["CPUExecutionProvider"]
    )
    ours = ort.InferenceSession(str(ours_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    assert {o.name for o in ours.get_outputs()} == {o.name for o in theirs.get_outputs()}

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 299, n).tolist() for n in (6, 11, 3)]
    ids, mask, pos = left_pad(prompts, 299)
    past = {n: np.zeros((3, 4, 0, 16), np.float32) for n in contract.past_names(2)}
    worst = 0.0
    out_names = [o.name for o in ours.get_outputs()]
    for _step in range(8):
        a = ours.run(out_names, _feeds(ours, ids, mask, pos, past))
        b = theirs.run(out_names, _feeds(theirs, ids, mask, pos, past))
        real = mask[:, -ids.shape[1] :].astype(bool)
        worst = max(worst, float(np.abs(a[0][real] - b[0][real]).max()))
        # Keys/values of pad positions differ after layer 0 (a fully masked pad query row is
        # handled differently); they are never attended to, so compare real positions only.
        for x, y in zip(a[1:], b[1:], strict=True):
            for row in range(3):
                keep = mask[row].astype(bool)
                assert np.abs(x[row][:, keep] - y[row][:, keep]).max() < 1e-4
        nxt = a[0][:, -1].argmax(-1)
        assert (nxt == b[0][:, -1].argmax(-1)).all()
        past = dict(zip(contract.past_names(2), a[1:], strict=True))
        ids = nxt[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
    assert worst < 1e-4, worst
