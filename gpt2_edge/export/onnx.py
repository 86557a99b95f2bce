"""PyTorch reference -> ``model.onnx`` with the KV cache, to the contract in ``gpt2_edge.contract``.

Exporter: torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``), the default and the
supported path since torch 2.9; the TorchScript exporter is deprecated and duplicates the tied
LM head when it folds constants. Two traps of the dynamo exporter are handled here
(notes/export-facts.md): ``total_sequence_length`` gets its own ``Dim`` (it cannot be declared
as past + seq), and the example uses a sequence length >= 2, since an example of length 1
silently fixes that dimension to 1.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from .. import contract
from ..errors import Gpt2EdgeError
from ..model.gpt import GPT
from .graph import check_contract, check_no_if, name_dims, name_nodes_by_module

DEFAULT_OPSET = 18


class _FlatKV(nn.Module):
    """The reference model with a flat signature: ``(ids, mask, pos, *past) -> (logits, *present)``."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):  # type: ignore[no-untyped-def]
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, presents = self.model(input_ids, attention_mask, position_ids, pairs)
        return (logits, *[t for kv in presents for t in kv])


def example_inputs(model: GPT, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[torch.Tensor, ...]:
    """Export example: seq >= 2 and past > 0 keep every dimension symbolic."""
    c = model.config
    ids = torch.randint(0, c.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).unsqueeze(0).expand(batch, seq).contiguous()
    kv = [torch.zeros(batch, c.n_head, past, c.head_size) for _ in range(2 * c.n_layer)]
    return (ids, mask, pos, *kv)


def export_onnx(
    model: GPT, path: str | Path, opset: int = DEFAULT_OPSET, external_data: bool = False
) -> None:
    """Export ``model`` (fp32, eval) to ``path`` following the contract.

    With ``external_data`` the weights go to ``<path>.data`` (needed past protobuf's 2 GB limit).
    Afterwards the graph gets the contract's dim names and module-path node names, and is checked.
    """
    c = model.config
    if opset < 17:
        raise Gpt2EdgeError(f"opset must be >= 17 (LayerNormalization), got {opset}")
    model = model.float().eval()
    dim = torch.export.Dim
    b = dim(contract.BATCH, min=1, max=4096)
    s = dim(contract.SEQ, min=1, max=c.n_positions)
    p = dim(contract.PAST, min=0, max=c.n_positions)
    t = dim(contract.TOTAL, min=1, max=2 * c.n_positions)
    shapes = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in range(2 * c.n_layer)))
    specs_in = contract.inputs(c.n_layer, c.n_head, c.head_size)
    specs_out = contract.outputs(c.n_layer, c.n_head, c.head_size, c.vocab_size)
    # "torchvision is not installed. Skipping torchvision::nms" and friends: noise for GPT-2.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # per-axis notices and deprecations from the exporter
        program = torch.onnx.export(
            _FlatKV(model),
            example_inputs(model),
            input_names=[x.name for x in specs_in],
            output_names=[x.name for x in specs_out],
            dynamic_shapes=shapes,
            opset_version=opset,
            dynamo=True,
            external_data=external_data,
            optimize=True,
            verbose=False,
        )
        program.save(str(path), external_data=external_data)
        del program
    _drop_exporter_weights()
    proto = onnx.load(str(path), load_external_data=False)  # structure only; weights stay put
    name_dims(proto, specs_out)
    name_nodes_by_module(proto)
    check_contract(proto, specs_in, specs_out)
    check_no_if(proto)
    onnx.save(proto, str(path))


def _drop_exporter_weights() -> None:
    """Cut the exporter's ONNX IR values loose from their tensors.

    torch 2.13's exporter leaves an ONNX IR graph alive after ``export`` returns (not the one
    ``ONNXProgram.model`` names; we found no owner to release), and its values hold every
    parameter and the optimizer's folded copies (the transposed Linear weights): a second copy
    of the weights, and the model outliving the caller's ``del`` (gpt2-medium: 2.6 GiB held
    through the rest of the export). The tensors are in the saved file by now; no other IR
    graph is alive during an export.

    The walk tests each object's ``type()``, not ``isinstance``: ``onnx_ir.Value`` is a
    ``Protocol`` subclass, whose ``isinstance`` reads the object's ``__class__`` attribute, and
    ``torch.distributed.reduce_op`` (a live module-level object) warns "is deprecated" on every
    attribute read: the walk printed that warning twice in every ``export`` and ``demo``.
    """
    import gc

    import onnx_ir

    for obj in gc.get_objects():
        if issubclass(type(obj), onnx_ir.Value) and obj.const_value is not None:
            obj.const_value = None


def weight_bytes(model: GPT) -> int:
    """Bytes of fp32 weights the ONNX file will hold (the tied head is stored once)."""
    return sum(t.numel() for t in model.state_dict().values()) * 4
