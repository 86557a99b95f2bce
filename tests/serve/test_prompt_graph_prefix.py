"""The server with an int4 bundle's prompt graph (quantize/int4.py): the prefix cache offers only
the positions a prompt wrote."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2_edge.runtime.bundle import Bundle
from gpt2_edge.runtime.sampling import GenerationConfig
from gpt2_edge.runtime.sequence import SequenceState
from gpt2_edge.runtime.session import OrtBackend
from gpt2_edge.serve.admission import KVMemory

pytestmark = pytest.mark.filterwarnings("ignore")


def test_the_servers_prefix_cache_counts_only_a_sequences_prompt(make_bundle):
    """serve/admission.py: the rows a released or running slot offers for reuse are its prompt's
    (plus its generated tokens' without a prompt graph)."""
    int4 = make_bundle(kv_cache="inplace", precision="int4")
    p = np.random.default_rng(5).integers(0, 299, 9).tolist()
    for graph, offered in ((None, p), (False, [*p, 4, 8])):
        backend = OrtBackend(Bundle.load(int4), threads=2, prompt_graph=graph)
        memory = KVMemory(backend, n_ctx=backend.n_ctx, max_batch=2, prefix_block=4)
        cache = memory.new_cache()
        state = SequenceState(p, GenerationConfig(max_new_tokens=4), None, lambda _: "")
        cache.prefill([0], [p])
        for t in (4, 8):
            state.append(t)
        cache.decode([0], [4])
        cache.decode([0], [8])
        assert memory.written(0, state) == offered
