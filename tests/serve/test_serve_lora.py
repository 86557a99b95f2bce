"""LoRA adapters on the server: a request picks one by ``model`` (vLLM's convention), /v1/models lists
them, an unknown model is a 404, and rows of different adapters decode in one batch, each exactly as
the Generator decodes it alone. Torch-free: the slot bundle comes from tests/bundles.py, the adapters
are written with numpy (tests/lora_helpers.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from gpt2_edge.runtime.generator import Generator  # noqa: E402
from gpt2_edge.runtime.loader import load_model  # noqa: E402
from gpt2_edge.runtime.sampling import GenerationConfig  # noqa: E402
from gpt2_edge.serve.app import ServeSettings, create_app  # noqa: E402
from gpt2_edge.serve.settings import SettingsError  # noqa: E402
from tests.bundles import LORA_SLOTS  # noqa: E402
from tests.lora_helpers import write_adapter  # noqa: E402
from tests.serve.test_serve import Server  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

PROMPTS = ["First Citizen:", "All:\nSpeak", "We are accounted poor", "O", "Second Citizen:", "Let us kill"]
MODELS = ["a1", "tiny", "a2", "a1", None, "a2"]  # None: no `model` field = the base model


@pytest.fixture(scope="module")
def model(make_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    lora = {
        "a1": write_adapter(root / "a1", seed=1, r=4, alpha=8),
        "a2": write_adapter(root / "a2", seed=2, r=8, alpha=16, targets=("attn.c_attn", "mlp.c_fc")),
    }
    return load_model(make_bundle(LORA_SLOTS), threads=1, name="tiny", lora=lora)


@pytest.fixture(scope="module")
def server(model):
    with Server(create_app(model, ServeSettings(max_batch=8, max_queue=32))) as s:
        yield s


def complete(server, prompt: str, model: str | None, **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}
    if model is not None:
        body["model"] = model
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)


def test_models_lists_the_adapters(server):
    data = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny", "a1", "a2"]
    assert all(m["parent"] == "tiny" for m in data[1:])


def test_unknown_model_is_404(server):
    r = complete(server, "O", "nope")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and "'tiny', 'a1', 'a2'" in err["message"]


def test_mixed_adapters_in_one_batch_equal_each_alone(server, model):
    gen = Generator(model)
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    want = [
        gen.generate(p, cfg, adapter=None if m in (None, "tiny") else m)[0].text
        for p, m in zip(PROMPTS, MODELS, strict=True)
    ]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # together: the engine batches them
        answers = list(pool.map(lambda pm: complete(server, *pm), zip(PROMPTS, MODELS, strict=True)))
    assert [a.status_code for a in answers] == [200] * len(PROMPTS)
    assert [a.json()["choices"][0]["text"] for a in answers] == want
    assert [a.json()["model"] for a in answers] == [m or "tiny" for m in MODELS]
    # the adapters do change what is said
    base = [gen.generate(p, cfg)[0].text for p in PROMPTS]
    assert any(w != b for w, b, m in zip(want, base, MODELS, strict=True) if m not in (None, "tiny"))


def test_chat_takes_an_adapter(server):
    body = {
        "model": "a2",
        "messages": [{"role": "user", "content": "Speak"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "a2"


def test_echo_logprobs_with_an_adapter_refused(server):
    r = complete(server, "O", "a1", echo=True, logprobs=1)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_with_adapter"


@pytest.mark.parametrize("lora", [("a1",), ("=x",), ("a=x", "a=y")])
def test_lora_setting_refused(lora):
    with pytest.raises(SettingsError, match="lora"):
        ServeSettings(lora=lora)


def test_prefix_cache_never_shares_rows_between_adapters(model):
    """Prompts sharing a 24-token prefix, one after the other, the base model and adapters: each
    equals the Generator alone with its adapter (rows of another adapter, or of the base model,
    would change its tokens), and the base model's second prompt reuses the first's rows."""
    from tests.serve.helpers import Run

    gen = Generator(model)
    system = gen.tokenizer.encode(PROMPTS[2] * 8)[:24]
    cfg = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    jobs = [
        ("base", None),
        ("base-again", None),
        ("a1", "a1"),
        ("a1-again", "a1"),
        ("a2", "a2"),
        ("base-3", None),
    ]
    run = Run(gen, max_batch=2, max_queue=8, prefix_cache=True, prefix_block=8)
    run.engine.start()
    try:
        for i, (name, adapter) in enumerate(jobs):
            prompt = system + gen.tokenizer.encode(f" {i}")
            handle = run.sequence(name, prompt, cfg)
            handle.adapter_id = model.adapter_id(adapter)
            run.engine.submit([handle])
            run.wait()
            assert run.tokens[name] == gen.generate([prompt], cfg, adapter=adapter)[0].token_ids, name
    finally:
        run.engine.close()
    assert run.hits() >= 1  # base-again from base's rows (the adapters' tokens above: none reused across)
