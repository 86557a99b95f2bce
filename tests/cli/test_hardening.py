"""Issue 8 (hardening): nothing lost, no traceback, one import. One test (or more) per defect found."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2_edge.cli import main
from gpt2_edge.export.bundle import export_bundle
from gpt2_edge.model.checkpoint import DEFAULT_MODEL_DIR, CheckpointError, load_checkpoint, save_checkpoint
from gpt2_edge.runtime.bundle import Bundle, BundleError, sha256_file
from gpt2_edge.runtime.sampling import GenerationConfig
from tests.helpers import REPO, SAMPLE_TEXT, SHAKESPEARE, random_gpt, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")
quiet = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_checkpoint):
    """A private copy of the tiny checkpoint: a defect here would destroy it."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("own") / "ckpt"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, ckpt):
    return export_bundle(ckpt, tmp_path_factory.mktemp("hb") / "bundle", target="tensorrt", **quiet)


@pytest.fixture
def copy(bundle, tmp_path):
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# 1. never destroy or leak a user's files ----------------------------------------------------------
def intact_checkpoint(path: Path) -> None:
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert not (path / "bundle.json").exists()


@pytest.mark.parametrize("where", ["same", "parent", "inside", "symlink"])
def test_export_refuses_an_output_that_is_contains_or_lies_in_its_source(tmp_path, ckpt, capsys, where):
    src = Path(shutil.copytree(ckpt, tmp_path / "src" / "ckpt"))
    out = {"same": src, "parent": src.parent, "inside": src / "bundle", "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(src, target_is_directory=True)
    err = one_line_error(capsys, ["export", str(src), "-o", str(out), "--overwrite", "--target", "tensorrt"])
    assert {"same": "is the source", "parent": "contains the source", "inside": "lies inside the source"}.get(
        where, "is the source"
    ) in err
    intact_checkpoint(src)
    assert not (src / "bundle").exists()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_quantize_refuses_to_write_over_its_source(copy, capsys, where):
    out = copy if where == "same" else copy / "int4"
    before = sha256_file(copy / "model.onnx")
    argv = ["quantize", str(copy), "--precision", "int4", "-o", str(out), "--overwrite", "--force", "--quiet"]
    err = one_line_error(capsys, argv)
    assert "source" in err and "choose another output" in err
    assert Bundle.load(copy).precision == "fp32" and sha256_file(copy / "model.onnx") == before


def test_overwrite_replaces_only_what_the_command_writes(tmp_path, ckpt, capsys):
    """--overwrite replaces an earlier bundle, never a directory of other files."""
    keep = tmp_path / "photos"
    keep.mkdir()
    (keep / "a.jpg").write_bytes(b"x")
    err = one_line_error(
        capsys, ["export", str(ckpt), "-o", str(keep), "--overwrite", "--target", "tensorrt"]
    )
    assert "is not a bundle" in err and (keep / "a.jpg").read_bytes() == b"x"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    err = one_line_error(capsys, ["export", str(ckpt), "-o", str(a_file), "--overwrite"])
    assert "is a file" in err and a_file.read_text() == "mine"


def test_train_refuses_to_replace_its_text_or_a_foreign_directory(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.txt").write_text(SAMPLE_TEXT * 3)
    small = ["--max-steps", "2", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--quiet"]
    err = one_line_error(capsys, ["train", "--text", str(data / "corpus.txt"), "-o", str(data), *small])
    assert "contains the source" in err and (data / "corpus.txt").read_text() == SAMPLE_TEXT * 3
    err = one_line_error(capsys, ["train", "--text", str(data / "corpus.txt"), "-o", str(tmp_path), *small])
    assert "contains the source" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("mine")
    err = one_line_error(
        capsys, ["train", "--text", str(data / "corpus.txt"), "-o", str(other), "--overwrite", *small]
    )
    assert "is not a checkpoint" in err and (other / "x").read_text() == "mine"


def test_demo_refuses_to_write_into_the_default_model(capsys):
    err = one_line_error(capsys, ["demo", "-o", str(DEFAULT_MODEL_DIR)])
    assert "lies inside the source" in err
    assert sorted(p.name for p in DEFAULT_MODEL_DIR.iterdir() if p.is_dir()) == []


def staging_dirs(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.tmp-*"))


def test_sigterm_during_export_leaves_nothing(tmp_path, ckpt):
    out = tmp_path / "out" / "bundle"
    cmd = [sys.executable, "-m", "gpt2_edge", "export", str(ckpt), "-o", str(out), "--target", "tensorrt"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out.parent.is_dir() and staging_dirs(out.parent, "bundle")):
            assert proc.poll() is None and time.monotonic() < deadline, "export ended before staging"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated" in err
    assert list(out.parent.iterdir()) == []


def write_staging(parent: Path, name: str, record: dict | None) -> Path:
    d = parent / f".{name}.tmp-{len(list(parent.iterdir()))}abc"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"half written")
    if record is not None:
        from gpt2_edge.fsutil import OWNER_FILE

        (d / OWNER_FILE).write_text(json.dumps(record))
    return d


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staging_dirs_are_removed_live_ones_kept(tmp_path):
    from gpt2_edge.fsutil import owner_record, remove_stale_staging

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = write_staging(tmp_path, "b", owner_record(sleeper.pid))
        me = write_staging(tmp_path, "b", owner_record())
        dead = write_staging(tmp_path, "b", {**owner_record(), "pid": dead_pid(), "start": None})
        reused = write_staging(tmp_path, "b", {**owner_record(), "start": "1"})  # our pid, another start
        rebooted = write_staging(tmp_path, "b", {**owner_record(sleeper.pid), "boot_id": "an-earlier-boot"})
        elsewhere = write_staging(tmp_path, "b", {**owner_record(), "pid": dead_pid(), "host": "other-host"})
        unknown = write_staging(tmp_path, "b", None)  # no owner file (yet): cannot prove it dead
        other_target = write_staging(tmp_path, "c", {**owner_record(), "pid": dead_pid()})
        removed = remove_stale_staging(tmp_path / "b")
        assert sorted(removed) == sorted([dead, reused, rebooted])
        for d in (live, me, elsewhere, unknown, other_target):
            assert d.is_dir(), d
        for d in (dead, reused, rebooted):
            assert not d.exists(), d
    finally:
        sleeper.kill()
        sleeper.wait()


def test_next_export_removes_a_dead_runs_staging_dir_and_keeps_a_live_one(tmp_path, ckpt):
    from gpt2_edge.fsutil import OWNER_FILE, owner_record

    out = tmp_path / "bundle"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = write_staging(tmp_path, "bundle", owner_record(sleeper.pid))
        dead = write_staging(tmp_path, "bundle", {**owner_record(), "pid": dead_pid(), "start": None})
        export_bundle(ckpt, out, target="tensorrt", **quiet)
        assert live.is_dir() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the owner file is staging bookkeeping: never published, never listed in the manifest
    assert not (out / OWNER_FILE).exists() and OWNER_FILE not in Bundle.load(out).manifest.files


def test_publish_keeps_the_earlier_output_if_the_swap_is_interrupted(tmp_path, monkeypatch):
    from gpt2_edge import fsutil

    dst, new = tmp_path / "out", tmp_path / "new"
    dst.mkdir()
    (dst / "bundle.json").write_text("old")
    new.mkdir()
    (new / "bundle.json").write_text("new")
    real, calls = os.replace, []

    def interrupted(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt  # SIGINT / SIGTERM between the two renames
        real(a, b)

    monkeypatch.setattr(fsutil.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fsutil.publish_dir(new, dst, overwrite=True)
    assert (dst / "bundle.json").read_text() == "old"


def test_overwriting_a_symlinked_output_leaves_the_linked_directory_alone(tmp_path):
    from gpt2_edge.fsutil import publish_dir

    linked, link, new = tmp_path / "linked", tmp_path / "link", tmp_path / "new"
    linked.mkdir()
    (linked / "bundle.json").write_text("old")
    link.symlink_to(linked, target_is_directory=True)
    new.mkdir()
    (new / "bundle.json").write_text("new")
    publish_dir(new, link, overwrite=True)
    assert not link.is_symlink() and (link / "bundle.json").read_text() == "new"
    assert (linked / "bundle.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "linked"]


# 2. the manifest is checked as a whole --------------------------------------------------------------
def edit_manifest(bundle_dir: Path, fn) -> None:
    path = bundle_dir / "bundle.json"
    m = json.loads(path.read_text())
    m = fn(m) or m
    path.write_text(json.dumps(m))


def test_manifest_that_is_a_list_is_refused(copy, capsys):
    edit_manifest(copy, lambda m: [m])
    with pytest.raises(BundleError, match=r"bundle.json is a JSON list, not an object.*re-export"):
        Bundle.load(copy)
    assert "not an object" in one_line_error(capsys, ["inspect", str(copy)])


def drop(path: str):
    def fn(m):
        keys = path.split("/")
        d = m
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]

    return fn


@pytest.mark.parametrize(
    "path,named",
    [
        ("generation/context_length", "generation.context_length"),
        ("generation/eos_token_id", "generation.eos_token_id"),
        ("files/model.onnx/bytes", "files['model.onnx'].bytes"),
        ("files/tokenizer.json/sha256", "files['tokenizer.json'].sha256"),
        ("model/n_head", "model.n_head"),
        ("model/head_size", "model.head_size"),
        ("io/inputs", "io.inputs"),
        ("io", "io"),
        ("precision", "precision"),
        ("model_file", "model_file"),
        ("files", "files"),
    ],
)
def test_missing_key_is_named(copy, path, named):
    edit_manifest(copy, drop(path))
    with pytest.raises(BundleError) as e:
        Bundle.load(copy)
    msg = str(e.value)
    assert f"{named} is missing" in msg and "re-export the bundle" in msg


def setter(path: str, value):
    def fn(m):
        keys = path.split("/")
        d = m
        for k in keys[:-1]:
            d = d[int(k)] if isinstance(d, list) else d[k]
        d[int(keys[-1]) if isinstance(d, list) else keys[-1]] = value

    return fn


@pytest.mark.parametrize(
    "path,value,msg",
    [
        ("model/n_head", "four", "model.n_head must be an integer, got 'four'"),
        ("model/n_head", True, "model.n_head must be an integer, got True"),
        ("model/n_layer", 0, "model.n_layer must be >= 1, got 0"),
        ("generation/context_length", 1.5, "generation.context_length must be an integer, got 1.5"),
        ("generation", [], "generation must be an object, got a list"),
        ("files/model.onnx/bytes", "12", "files['model.onnx'].bytes must be an integer, got '12'"),
        ("files/model.onnx/sha256", "abc", "files['model.onnx'].sha256 must be 64 hex digits"),
        ("files/model.onnx", 5, "files['model.onnx'] must be an object, got an integer"),
        ("io/inputs", {}, "io.inputs must be a list, got an object"),
        ("io/inputs/0/dtype", "int3", "io.inputs[0].dtype must be one of"),
        ("io/inputs/0/shape", "batch", "io.inputs[0].shape must be a list"),
        ("precision", "int3", "precision must be one of fp32, fp16, bf16, int8-dynamic"),
        ("target", "gpu", "target must be one of ort, tensorrt"),
        ("kv_cache", "ring", "kv_cache must be one of inplace, concat"),
        ("model_file", "nope.onnx", "model_file 'nope.onnx' is not listed in files"),
        ("model/head_size", 3, "model.head_size (3) x model.n_head (4) must equal model.n_embd (64)"),
        (
            "generation/context_length",
            4096,
            "generation.context_length (4096) exceeds model.n_positions (64)",
        ),
        ("io/inputs/3/shape/1", 7, "io.inputs[3].shape[1] is 7, model.n_head is 4"),
        ("io/outputs/0/shape/2", 5, "io.outputs[0].shape[2] is 5, model.vocab_size is"),
        ("io/inputs/0/name", "tokens", "io.inputs[0].name is 'tokens', the contract says 'input_ids'"),
    ],
)
def test_wrong_type_or_value_is_named(copy, path, value, msg):
    edit_manifest(copy, setter(path, value))
    with pytest.raises(BundleError) as e:
        Bundle.load(copy)
    assert msg in str(e.value) and "re-export the bundle" in str(e.value)


def rename_entry(old: str, new: str):
    def fn(m):
        m["files"][new] = m["files"].pop(old)

    return fn


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "sub\\x", "a/../../x", "", "C:x", "./x"])
def test_file_entries_must_be_plain_names_inside_the_bundle(copy, tmp_path, name):
    (tmp_path / "x").write_text("outside")
    edit_manifest(copy, lambda m: m["files"].update({name: {"bytes": 7, "sha256": "0" * 64}}))
    with pytest.raises(BundleError, match=r"not a plain relative name inside the bundle"):
        Bundle.load(copy)


def test_a_symlink_out_of_the_bundle_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy2(copy / "tokenizer.json", outside)
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to(outside)
    with pytest.raises(BundleError, match="points outside the bundle"):
        Bundle.load(copy)


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory, tiny_tokenizer):
    """Same vocabulary and layer count, other width and heads: another model's graph."""
    config = tiny_config(n_layer=2, n_embd=32, n_head=2, vocab_size=tiny_tokenizer.vocab_size)
    return save_checkpoint(
        random_gpt(config, seed=3), tmp_path_factory.mktemp("oc") / "other", tiny_tokenizer
    )


def test_another_models_graph_rehashed_is_refused_at_load(copy, other_ckpt, tmp_path, capsys):
    other = export_bundle(other_ckpt, tmp_path / "other", target="tensorrt", **quiet)
    shutil.copy2(other / "model.onnx", copy / "model.onnx")
    f = copy / "model.onnx"
    edit_manifest(copy, setter("files/model.onnx", {"bytes": f.stat().st_size, "sha256": sha256_file(f)}))
    from gpt2_edge.runtime.generator import Generator

    with pytest.raises(BundleError, match=r"does not match bundle.json.*re-export the bundle"):
        Generator.from_bundle(copy)
    err = one_line_error(capsys, ["generate", str(copy), "--prompt", "All:"])
    assert "Failed to find" not in err and "re-export" in err


def test_validate_against_a_checkpoint_of_other_dims_says_so(bundle, other_ckpt, capsys):
    err = one_line_error(capsys, ["validate", str(bundle), str(other_ckpt)])
    assert "dims differ" in err and "n_embd 64 vs 32" in err and "n_head 4 vs 2" in err
    assert "onnxruntime" not in err.lower()


# 3. every input gets a clear, early error ----------------------------------------------------------
def test_invalid_utf8_prompt_is_refused_in_one_line(bundle, capsys):
    bad = b"\xff\xfe".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    err = one_line_error(capsys, ["generate", str(bundle), "--prompt", bad])
    assert "--prompt is not valid UTF-8" in err
    err = one_line_error(capsys, ["generate", str(bundle), "--prompt", "All:", "--stop", bad])
    assert "--stop is not valid UTF-8" in err


def test_invalid_utf8_from_argv_and_stdin_in_a_process(bundle):
    cmd = [sys.executable, "-m", "gpt2_edge", "generate", str(bundle), "--max-new-tokens", "2"]
    res = subprocess.run([*cmd, "--prompt", b"\xff\xfe"], capture_output=True, timeout=120)
    assert res.returncode == 2 and b"--prompt is not valid UTF-8" in res.stderr, res.stderr
    res = subprocess.run(cmd, input=b"All:\xff", capture_output=True, timeout=120)
    assert res.returncode == 2 and b"standard input is not valid UTF-8" in res.stderr, res.stderr
    assert b"Traceback" not in res.stderr


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
        (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
        (dict(max_new_tokens="8"), "max_new_tokens must be an integer"),
        (dict(min_new_tokens=1.0), "min_new_tokens must be an integer"),
        (dict(num_beams=1.5), "num_beams must be an integer"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(top_k=False), "top_k must be an integer"),
        (dict(stop="thee"), "stop must be a list or tuple of strings"),
        (dict(stop=["ok", 3]), "stop[1] must be a string"),
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(seed=1.5), "seed must be a non-negative integer"),
        (dict(seed=True), "seed must be a non-negative integer"),
        (dict(length_penalty=math.nan), "length_penalty must be a finite number"),
        (dict(length_penalty=math.inf), "length_penalty must be a finite number"),
        (dict(length_penalty="1"), "length_penalty must be a finite number"),
        (dict(temperature="hot"), "temperature must be a number"),
        (dict(temperature=None), "temperature must be a number"),
        (dict(top_p="0.9"), "top_p must be a number"),
        (dict(top_p=True), "top_p must be a number"),
        (dict(repetition_penalty=[1.2]), "repetition_penalty must be a number"),
        (dict(do_sample="yes"), "do_sample must be True or False"),
        (dict(truncate=1), "truncate must be True or False"),
        (dict(early_stopping=1), "early_stopping must be True, False or 'never'"),
    ],
)
def test_generation_config_checks_types_and_names_the_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        GenerationConfig(**kwargs)
    assert field in str(e.value)


def test_generation_config_accepts_lists_and_numpy_numbers():
    import numpy as np

    c = GenerationConfig(max_new_tokens=np.int64(4), stop=["a", "b"], seed=np.int32(3), top_p=np.float32(0.5))
    assert c.stop == ("a", "b") and c.max_new_tokens == 4 and type(c.max_new_tokens) is int
    assert c.seed == 3 and c.top_p == 0.5


def test_cli_negative_seed_names_the_seed(bundle, capsys):
    err = one_line_error(capsys, ["generate", str(bundle), "--prompt", "All:", "--seed", "-1", "--sample"])
    assert "seed must be a non-negative integer, got -1" in err


def test_inspect_a_file_says_it_is_a_file(bundle, capsys):
    err = one_line_error(capsys, ["inspect", str(bundle / "model.onnx")])
    assert "is a file, not a bundle directory" in err and "does not exist" not in err
    err = one_line_error(capsys, ["inspect", str(bundle / "bundle.json")])
    assert f"pass its directory {bundle}" in err


@pytest.mark.parametrize(
    "key,value,msg",
    [
        ("n_head", "four", "'n_head' must be an integer, got 'four'"),
        ("n_layer", 2.5, "'n_layer' must be an integer, got 2.5"),
        ("vocab_size", None, "'vocab_size' must be an integer, got None"),
        ("n_embd", True, "'n_embd' must be an integer, got True"),
        ("layer_norm_epsilon", "small", "'layer_norm_epsilon' must be a number, got 'small'"),
        ("eos_token_id", "end", "'eos_token_id' must be an integer, got 'end'"),
    ],
)
def test_non_numeric_config_value_names_the_file_and_key(tmp_path, ckpt, capsys, key, value, msg):
    bad = Path(shutil.copytree(ckpt, tmp_path / "bad"))
    cfg = json.loads((bad / "config.json").read_text())
    cfg[key] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert str(bad / "config.json") in str(e.value) and msg in str(e.value)
    err = one_line_error(capsys, ["generate", str(bad), "--prompt", "All:"])
    assert msg in err


def test_missing_vocab_size_and_a_list_config_are_named(tmp_path, ckpt):
    bad = Path(shutil.copytree(ckpt, tmp_path / "bad"))
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["vocab_size"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: 'vocab_size' is missing"):
        load_checkpoint(bad)
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json holds a list, not an object"):
        load_checkpoint(bad)


# 5. the API and layout a newcomer expects ----------------------------------------------------------
def test_top_level_imports_are_lazy_and_torch_free():
    code = (
        "import sys\n"
        "import gpt2_edge\n"
        "assert 'gpt2_edge.runtime' not in sys.modules, 'eager'\n"
        "from gpt2_edge import Generator, GenerationConfig\n"
        "assert GenerationConfig(max_new_tokens=3).max_new_tokens == 3 and callable(Generator.from_bundle)\n"
        "assert {'Generator', 'GenerationConfig'} <= set(dir(gpt2_edge))\n"
        "try:\n    gpt2_edge.Nope\nexcept AttributeError as e:\n    assert 'Nope' in str(e)\n"
        "bad = [m for m in ('torch', 'transformers', 'onnx', 'safetensors') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_readme_python_example_uses_the_top_level_import():
    # The README's tour runs as a doctest (the root conftest.py); here: it shows the front door.
    readme = (REPO / "README.md").read_text()
    assert ">>> from gpt2_edge import Generator, GenerationConfig" in readme


def test_progress_only_on_a_terminal(capsys, monkeypatch):
    import numpy as np

    from gpt2_edge.model.evaluate import perplexity

    def uniform(window):
        return np.zeros((1, window.shape[1], 7))

    perplexity(uniform, list(range(7)) * 20, 16, progress=True)
    assert capsys.readouterr().err == ""  # stderr is not a terminal here
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    perplexity(uniform, list(range(7)) * 20, 16, progress=True)
    assert "window" in capsys.readouterr().err
    perplexity(uniform, list(range(7)) * 20, 16, progress=False)  # --quiet
    assert capsys.readouterr().err == ""


def test_eval_of_a_bundle_is_torch_free_and_quiet_when_piped(bundle, tmp_path):
    """tqdm comes with the export extra; the bar is drawn only on a terminal, so eval needs neither."""
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    code = (
        "import sys\n"
        "from gpt2_edge.cli import main\n"
        f"assert main(['eval', {str(bundle)!r}, '--text', {str(text)!r}, '--json']) == 0\n"
        "assert 'torch' not in sys.modules and 'tqdm' not in sys.modules, 'heavy import'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tokens"] > 0 and res.stderr == ""


def test_export_shows_its_stages_on_a_terminal(tmp_path, ckpt, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    export_bundle(ckpt, tmp_path / "b", target="tensorrt", progress=True, **quiet)
    err = capsys.readouterr().err
    assert "export" in err and "stage" in err
    assert main(["export", str(ckpt), "-o", str(tmp_path / "c"), "--target", "tensorrt", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_shipped_text_samples_come_from_the_right_splits():
    heldout, calib = DEFAULT_MODEL_DIR / "heldout.txt", DEFAULT_MODEL_DIR / "calib.txt"
    assert 15_000 <= heldout.stat().st_size <= 40_000 and 8_000 <= calib.stat().st_size <= 40_000
    card = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    assert "heldout.txt" in card and "calib.txt" in card
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text()
        cut = int(len(text) * 0.9)  # the trainer's split (val_fraction 0.1, on characters)
        assert heldout.read_text() in text[cut:] and calib.read_text() in text[:cut]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"default_model/*"' in pyproject or "heldout.txt" in pyproject


def test_quantize_without_eval_uses_the_default_models_sample_only_for_it(tmp_path, ckpt, monkeypatch):
    """The default model is stood in for by the tiny checkpoint with its own samples."""
    from gpt2_edge.quantize import pipeline

    default = Path(shutil.copytree(ckpt, tmp_path / "default_model"))
    (default / "heldout.txt").write_text(SAMPLE_TEXT[: len(SAMPLE_TEXT) // 2])
    (default / "calib.txt").write_text(SAMPLE_TEXT)
    monkeypatch.setattr(pipeline, "DEFAULT_MODEL_DIR", default)
    mine = export_bundle(default, tmp_path / "fp32", **quiet)
    out, rep = pipeline.quantize_bundle(mine, "int8-dynamic", tmp_path / "int8", force=True, **quiet)
    assert rep is not None and Bundle.load(out).manifest.accuracy["text"].endswith("heldout.txt")
    other = export_bundle(ckpt, tmp_path / "other", **quiet)  # same weights, but not the default's files
    monkeypatch.setattr(pipeline, "DEFAULT_MODEL_DIR", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs held-out text: pass --eval FILE"):
        pipeline.quantize_bundle(other, "int8-dynamic", tmp_path / "int8b", **quiet)


@pytest.mark.slow
def test_cli_quantize_of_the_default_model_needs_no_eval(tmp_path, capsys):
    b = tmp_path / "default-bundle"
    assert main(["export", "-o", str(b), "--quiet"]) == 0
    assert (
        main(["quantize", str(b), "--precision", "int8-dynamic", "-o", str(tmp_path / "q"), "--quiet"]) == 0
    )
    out = capsys.readouterr().out
    assert "heldout.txt" in out and "bundle written" in out


def test_demo_needs_nothing_beside_the_checkout(tmp_path, ckpt, capsys):
    from gpt2_edge.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.text is None or Path(args.text).resolve().is_relative_to(DEFAULT_MODEL_DIR)
    text = tmp_path / "heldout.txt"
    text.write_text(SAMPLE_TEXT)
    argv = ["demo", "--model", str(ckpt), "--text", str(text), "-o", str(tmp_path / "demo")]
    assert main([*argv, "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    for step in ("export", "validate", "quantize", "generate", "precision", "tokens/s"):
        assert step in out, step
    table = out.split("precision", 1)[1]
    assert "fp32" in table and "int8-dynamic" in table and "int4" in table
    assert (tmp_path / "demo" / "fp32" / "bundle.json").is_file()
