"""The torch-free runtime: parity with the reference and transformers, streaming, providers."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2_edge.runtime.generator import Generator, decode
from gpt2_edge.runtime.loader import Model
from gpt2_edge.runtime.sampling import GenerationConfig
from gpt2_edge.runtime.session import ProviderError, resolve_provider
from gpt2_edge.runtime.tokenizer import Tokenizer
from gpt2_edge.runtime.types import Capabilities

pytestmark = pytest.mark.filterwarnings("ignore")
PROMPTS = ["First Citizen:", "All:\nSpeak", "We are accounted poor citizens, the patricians good."]


@pytest.fixture(scope="module")
def gen(inplace_bundle):
    return Generator.from_bundle(str(inplace_bundle), threads=1)


@pytest.fixture(scope="module")
def ref(tiny_checkpoint):
    """The PyTorch reference (torch needed) the bundle was exported from."""
    from gpt2_edge.model.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint), Tokenizer.from_dir(tiny_checkpoint)


def torch_generate(*args):
    from gpt2_edge.model.generate import generate

    return generate(*args)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_reference_and_transformers(gen, ref, tiny_checkpoint, prompt):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = GenerationConfig(max_new_tokens=24)
    ours = gen.generate(prompt, cfg)[0]
    assert ours.token_ids == torch_generate(*ref, prompt, cfg)[0].token_ids
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    ids = torch.tensor([ref[1].encode(prompt)])
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=ref[1].eos_token_id,
        )
    assert ours.token_ids == out[0, ids.shape[1] :].tolist()


def test_padded_batch_equals_each_prompt_alone(gen):
    cfg = GenerationConfig(max_new_tokens=16)
    batch = gen.generate(PROMPTS, cfg)
    assert [r.token_ids for r in batch] == [gen.generate(p, cfg)[0].token_ids for p in PROMPTS]
    assert batch[0].prompt_tokens != batch[2].prompt_tokens  # really a padded batch


def test_sampling_and_beams_match_the_reference(gen, ref):
    for cfg in (
        GenerationConfig(
            max_new_tokens=16,
            do_sample=True,
            temperature=0.9,
            top_k=50,
            top_p=0.95,
            repetition_penalty=1.2,
            seed=123,
        ),
        GenerationConfig(max_new_tokens=10, num_beams=4),
    ):
        assert (
            gen.generate(PROMPTS[0], cfg)[0].token_ids == torch_generate(*ref, PROMPTS[0], cfg)[0].token_ids
        )


def test_seeded_sampling_reproducible(gen):
    cfg = GenerationConfig(max_new_tokens=20, do_sample=True, seed=5)
    assert gen.generate(PROMPTS[1], cfg)[0].token_ids == gen.generate(PROMPTS[1], cfg)[0].token_ids


def test_stream_joins_to_generated_text(gen):
    for cfg in (
        GenerationConfig(max_new_tokens=30),
        GenerationConfig(max_new_tokens=30, do_sample=True, seed=3),
    ):
        pieces = list(gen.stream(PROMPTS[0], cfg))
        assert "".join(pieces) == gen.generate(PROMPTS[0], cfg)[0].text
        assert gen.last_result is not None and len(gen.last_result.token_ids) == 30


class Scripted:
    """A backend that 'predicts' a fixed token sequence (one-hot logits), one script per cache."""

    capabilities = Capabilities("cpu")
    bundle = None

    def __init__(self, script: list[int], vocab: int, n_ctx: int = 64) -> None:
        self.script, self.vocab, self.n_ctx = script, vocab, n_ctx

    def new_cache(self, n_slots: int, capacity: int) -> ScriptedCache:
        return ScriptedCache(self, n_slots, capacity)


class ScriptedCache:
    def __init__(self, backend: Scripted, n_slots: int, capacity: int) -> None:
        self.b, self.n_slots, self.capacity, self.i = backend, n_slots, capacity, 0

    def _logits(self, rows: int) -> np.ndarray:
        logits = np.zeros((rows, self.b.vocab), np.float32)
        logits[:, self.b.script[min(self.i, len(self.b.script) - 1)]] = 10
        self.i += 1
        return logits

    def prefill(self, slots, prompts):
        return self._logits(len(slots))

    def decode(self, slots, tokens):
        return self._logits(len(slots))


@pytest.mark.parametrize(
    "text", ["héllo wörld", "emoji 😀🎉 and 👨‍👩‍👧", "東京は日本の首都です", "mixed é東😀x"]
)
def test_stream_never_splits_a_character(tiny_tokenizer, text):
    tok = tiny_tokenizer
    script = tok.encode(text)
    assert len(script) > len(text.split())  # multi-byte characters span several byte tokens
    gen = Generator(Model(Scripted(script, tok.vocab_size, 512), tok, None))
    pieces = list(gen.stream("x", GenerationConfig(max_new_tokens=len(script))))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_holds_back_a_stop_string(tiny_tokenizer):
    tok = tiny_tokenizer
    script = tok.encode("Speak, speak.\n\nAll:\nmore")
    gen = Generator(Model(Scripted(script, tok.vocab_size, 512), tok, None))
    cfg = GenerationConfig(max_new_tokens=len(script), stop=("\n\nAll:",))
    pieces = list(gen.stream("x", cfg))
    assert "".join(pieces) == "Speak, speak." == gen.last_result.text
    assert gen.last_result.finish_reason == "stop"


def test_stream_never_shows_the_eos_token(tiny_tokenizer):
    tok = tiny_tokenizer
    script = [*tok.encode("All: speak"), tok.eos_token_id]
    gen = Generator(Model(Scripted(script, tok.vocab_size, 64), tok, tok.eos_token_id))
    pieces = list(gen.stream("x", GenerationConfig(max_new_tokens=20)))
    assert "".join(pieces) == "All: speak" == gen.last_result.text
    assert gen.last_result.finish_reason == "eos"


def test_ignore_eos_decodes_to_max_new_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    script = [*tok.encode("All:"), tok.eos_token_id]  # eos, then eos forever
    gen = Generator(Model(Scripted(script, tok.vocab_size, 64), tok, tok.eos_token_id))
    plain = gen.generate("x", GenerationConfig(max_new_tokens=10))[0]
    assert plain.finish_reason == "eos" and len(plain.token_ids) < 10
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    res = gen.generate("x", cfg)[0]
    assert res.finish_reason == "length" and len(res.token_ids) == 10
    streamed = "".join(gen.stream("x", cfg))
    assert gen.last_result.token_ids == res.token_ids and streamed == res.text


def test_decode_with_scripted_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    script = [*tok.encode("All:"), tok.eos_token_id]
    res = decode(
        Scripted(script, tok.vocab_size),
        [[1]],
        GenerationConfig(max_new_tokens=20),
        eos_token_id=tok.eos_token_id,
        n_ctx=64,
        detokenize=tok.decode,
    )[0]
    assert res.text == "All:" and res.finish_reason == "eos" and res.token_ids[-1] == tok.eos_token_id


def test_providers():
    assert resolve_provider("cpu") == "cpu"
    assert resolve_provider("auto") in ("cpu", "cuda", "tensorrt")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ProviderError, match="CUDAExecutionProvider is not available"):
            resolve_provider("cuda")
    with pytest.raises(ProviderError, match="provider must be one of"):
        resolve_provider("tpu")


def test_context_overflow_and_truncation(gen):
    long = "Speak, speak. " * 40
    with pytest.raises(ValueError, match="> the model's context of 64"):
        gen.generate(long, GenerationConfig(max_new_tokens=8))
    r = gen.generate(long, GenerationConfig(max_new_tokens=8, truncate=True))[0]
    assert r.prompt_tokens == 56 and len(r.token_ids) == 8


def test_tensorrt_provider_options(tmp_path):
    from gpt2_edge.runtime.session import tensorrt_options

    opts = tensorrt_options(tmp_path, fp16=True, workspace_mib=512)
    assert opts["trt_engine_cache_enable"] and opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_fp16_enable"] is True and opts["trt_max_workspace_size"] == 512 * 2**20
    assert "trt_max_workspace_size" not in tensorrt_options(tmp_path, fp16=False, workspace_mib=None)
