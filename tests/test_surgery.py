"""Layer surgery on tiny random models of every supported architecture, built in-process (no network).

The reference for a pruned model is the unpruned model with the same layers skipped in place: both must give
bit-identical logits. Sliding windows are 4 tokens and inputs 16, so a wrong per-layer attention type shows.
"""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    DynamicCache,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from gradual.errors import UsageError
from gradual.surgery import (
    ORIGINAL_LAYERS_KEY,
    SUPPORTED_ARCHITECTURES,
    decoder_layers,
    num_layers,
    original_indices,
    remove_layers,
    skip_layers,
)
from gradual.tiny import tiny_model

VOCAB = 128
WINDOW = 4
SLIDING, FULL = "sliding_attention", "full_attention"
REMOVE = [0, 2]  # drops layer 0 too: the KV cache reads its length from the first layer
KEPT = [1, 3]

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
_LLAMA_LIKE = dict(_COMMON, num_key_value_heads=2, max_position_embeddings=128)
_CONFIGS = {
    "llama": lambda: LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: MistralConfig(**_LLAMA_LIKE, sliding_window=WINDOW),
    # Qwen: layers at or past max_window_layers slide -> layer_types [full, full, sliding, sliding].
    "qwen2": lambda: Qwen2Config(**_LLAMA_LIKE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "qwen3": lambda: Qwen3Config(
        **_LLAMA_LIKE, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2
    ),
    "gemma2": lambda: Gemma2Config(**_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW),
    "gemma3_text": lambda: Gemma3TextConfig(
        **_LLAMA_LIKE,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        layer_types=[SLIDING, FULL, SLIDING, FULL],
    ),
    "phi3": lambda: Phi3Config(**_LLAMA_LIKE, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda: GPTNeoXConfig(**_COMMON, max_position_embeddings=128),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2
    ),
    "opt": lambda: OPTConfig(**_COMMON, ffn_dim=128, max_position_embeddings=128, word_embed_proj_dim=64),
}
ARCHS = list(_CONFIGS)


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A 4-layer random model of `arch` in eval mode, with generation that never stops early."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_CONFIGS[arch]()).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def with_lora(model: torch.nn.Module) -> PeftModel:
    """LoRA on every linear layer with random (non-zero) B matrices, so adapters change the output."""
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def layer_idx_values(model: torch.nn.Module) -> list[list[int]]:
    """For each decoder layer, every `layer_idx` found inside it."""
    return [
        [m.layer_idx for m in layer.modules() if isinstance(m.__dict__.get("layer_idx"), int)]
        for layer in decoder_layers(model)
    ]


def test_supported_architectures_cover_the_tested_ones():
    assert set(ARCHS) <= set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_are_found_directly_and_through_peft(arch):
    model = tiny(arch)
    layers = decoder_layers(model)
    assert isinstance(layers, torch.nn.ModuleList) and num_layers(model) == 4
    assert original_indices(model) == [0, 1, 2, 3] == original_indices(model.config)
    peft_model = with_lora(model)
    assert decoder_layers(peft_model) is layers
    assert decoder_layers(peft_model.base_model) is layers


@pytest.mark.parametrize("arch", ARCHS)
def test_removed_model_equals_skipping_in_the_original(arch, ids):
    model = tiny(arch)
    reference = copy.deepcopy(model)
    types_before = getattr(model.config, "layer_types", None)

    assert remove_layers(model, REMOVE) == REMOVE

    assert num_layers(model) == 2 and model.config.num_hidden_layers == 2
    assert all(values and set(values) == {i} for i, values in enumerate(layer_idx_values(model)))
    assert original_indices(model) == KEPT == getattr(model.config, ORIGINAL_LAYERS_KEY)
    if types_before is not None:
        assert model.config.layer_types == [types_before[i] for i in KEPT]
    with skip_layers(reference, REMOVE):
        expected = logits(reference, ids)
    assert torch.equal(logits(model, ids), expected)
    assert not torch.equal(logits(reference, ids), expected)  # the removed layers did matter


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_generates_the_same_with_and_without_kv_cache(arch, ids):
    model = tiny(arch)
    remove_layers(model, REMOVE)
    with torch.no_grad():
        cached = model.generate(ids[:, :12], max_new_tokens=12, do_sample=False, use_cache=True)
        uncached = model.generate(ids[:, :12], max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape == (2, 24)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_skipping_keeps_cached_generation_consistent(arch, ids):
    """Skipped layers still write their own cache slot, so cache lengths stay right even when layer 0 is skipped."""
    model, reference = tiny(arch), tiny(arch)
    remove_layers(model, REMOVE)
    with torch.no_grad(), skip_layers(reference, REMOVE):
        skipped = reference.generate(ids[:, :12], max_new_tokens=12, do_sample=False, use_cache=True)
    with torch.no_grad():
        assert torch.equal(skipped, model.generate(ids[:, :12], max_new_tokens=12, do_sample=False, use_cache=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_pruned_model_reloads_cleanly_with_plain_transformers(arch, ids, tmp_path):
    model = tiny(arch)
    remove_layers(model, REMOVE)
    model.save_pretrained(tmp_path)

    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)

    assert {key: list(value) for key, value in info.items() if value} == {}
    assert reloaded.config.num_hidden_layers == 2 and num_layers(reloaded) == 2
    assert getattr(reloaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)
    assert original_indices(reloaded) == KEPT
    assert torch.equal(logits(reloaded.eval(), ids), logits(model, ids))


# Removals that leave no layer of one attention type (layer types above); a plain removal where there is one type.
EMPTYING = {"qwen2": [[0, 1]], "qwen3": [[2, 3]], "gemma2": [[1, 3]], "gemma3_text": [[1, 3], [0, 2]]}


def declared_buffers(model: torch.nn.Module) -> dict[str, bool]:
    """Every buffer by name, with whether it is persistent (saved in the state dict)."""
    return {f"{owner}.{leaf}" if owner else leaf: leaf not in module._non_persistent_buffers_set
            for owner, module in model.named_modules() for leaf in module._buffers}


@pytest.mark.parametrize(("arch", "removed"), [pytest.param(a, r, id=f"{a}-{'-'.join(map(str, r))}")
                                              for a in ARCHS for r in EMPTYING.get(a, [REMOVE])])
def test_pruned_model_holds_exactly_the_buffers_its_config_declares(arch, removed, ids):
    """Gemma3 keeps rotary tables per layer type: those of a type no kept layer has must go (FSDP's unshard copies
    buffers by name into a model rebuilt from the config); the kept ones stay as they were."""
    model, reference = tiny(arch), tiny(arch)
    before = dict(model.named_buffers())
    remove_layers(model, removed)

    assert declared_buffers(model) == declared_buffers(AutoModelForCausalLM.from_config(model.config))
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    with skip_layers(reference, removed):
        assert torch.equal(logits(model, ids), logits(reference, ids))
    for module in model.modules():  # re-initialising rotary tables walks the layer types the module lists
        model._init_weights(module)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_adapters_follow_their_layers(arch, ids, tmp_path):
    base = tiny(arch)
    pruned_base = copy.deepcopy(base)
    peft_model = with_lora(base)
    reference = copy.deepcopy(peft_model)
    adapters_before = get_peft_model_state_dict(peft_model)

    assert remove_layers(peft_model, REMOVE) == REMOVE

    assert peft_model.config is peft_model.get_base_model().config
    assert peft_model.config.num_hidden_layers == 2 and original_indices(peft_model) == KEPT
    with skip_layers(reference, REMOVE):
        expected = logits(reference, ids)
        with reference.disable_adapter():
            assert not torch.equal(logits(reference, ids), expected)  # the adapters matter
    assert torch.equal(logits(peft_model, ids), expected)

    # State-dict keys renumber with the list: new layer j holds the adapter of original layer KEPT[j].
    adapters_after = get_peft_model_state_dict(peft_model)
    layers_key = ".h." if arch == "gpt2" else ".layers."
    for key, value in adapters_after.items():
        if layers_key in key:
            head, tail = key.split(layers_key, 1)
            new_index, rest = tail.split(".", 1)
            value_before = adapters_before[f"{head}{layers_key}{KEPT[int(new_index)]}.{rest}"]
            assert torch.equal(value, value_before), key
    assert len(adapters_after) == len(adapters_before) // 2
    wrapped = {name for name, module in peft_model.base_model.model.named_modules() if hasattr(module, "lora_A")}
    assert set(peft_model.targeted_module_names) == wrapped

    # A saved adapter loads onto the base model pruned the same way.
    peft_model.save_pretrained(tmp_path)
    remove_layers(pruned_base, REMOVE)
    reloaded = PeftModel.from_pretrained(pruned_base, tmp_path).eval()
    assert torch.equal(logits(reloaded, ids), expected)


def test_lora_layers_to_transform_is_renumbered(ids, tmp_path):
    base = tiny("llama")
    pruned_base = copy.deepcopy(base)
    config = LoraConfig(
        r=4, target_modules=["q_proj"], layers_to_transform=[1, 3], layers_pattern="layers", init_lora_weights=False
    )
    torch.manual_seed(1)
    peft_model = get_peft_model(base, config).eval()

    remove_layers(peft_model, [1])

    assert peft_model.peft_config["default"].layers_to_transform == [2]
    assert peft_model.targeted_module_names == ["model.layers.2.self_attn.q_proj"]
    peft_model.save_pretrained(tmp_path)
    remove_layers(pruned_base, [1])
    reloaded = PeftModel.from_pretrained(pruned_base, tmp_path).eval()
    assert torch.equal(logits(reloaded, ids), logits(peft_model, ids))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_successive_removals_map_back_to_original_layers(arch, ids, tmp_path):
    model = tiny(arch)
    reference = copy.deepcopy(model)

    assert remove_layers(model, [1]) == [1]
    model.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert remove_layers(model, [2]) == [3]

    assert original_indices(model) == [0, 2]
    with skip_layers(reference, [1, 3]):
        assert torch.equal(logits(model, ids), logits(reference, ids))


def test_stale_layer_types_would_change_gemma3_logits(ids):
    model = tiny("gemma3_text")
    remove_layers(model, [1])
    assert model.config.layer_types == [SLIDING, SLIDING, FULL]
    right = logits(model, ids)
    model.config.layer_types = [SLIDING, FULL, SLIDING]  # the first three entries: the known mistake
    assert not torch.allclose(logits(model, ids), right, atol=1e-3)


def test_tiny_gemma3_keeps_layer_types_attention_and_cache_in_step(tmp_path):
    """`tiny:gemma3:6` (sliding, sliding, full, ...): removing a full and a sliding layer leaves the config's
    layer_types, each kept attention module's own window and the hybrid cache built from the config agreeing layer by
    layer; cached generation well past the window equals uncached, and so does the reload."""
    model = tiny_model("gemma3", num_layers=6)
    assert model.config.layer_types == [SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL]
    remove_layers(model, [2, 3])
    assert model.config.layer_types == [SLIDING, SLIDING, SLIDING, FULL]
    attention = [layer.self_attn for layer in decoder_layers(model)]
    assert [a.layer_idx for a in attention] == [0, 1, 2, 3]
    assert [a.sliding_window for a in attention] == [WINDOW, WINDOW, WINDOW, None]
    cache = DynamicCache(config=model.config)
    assert [layer.is_sliding for layer in cache.layers] == [True, True, True, False]
    ids = torch.randint(4, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        assert torch.equal(cached, model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False,
                                                  pad_token_id=0))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == model.config.layer_types
    assert [layer.self_attn.sliding_window for layer in decoder_layers(reloaded)] == [WINDOW, WINDOW, WINDOW, None]
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_qwen2_window_layer_count_agrees_with_layer_types():
    model = tiny("qwen2")
    assert model.config.layer_types == [FULL, FULL, SLIDING, SLIDING]
    remove_layers(model, [0])
    config = model.config
    assert config.max_window_layers == 1 and config.layer_types == [FULL, SLIDING, SLIDING]
    derived = config.to_dict()
    del derived["layer_types"]
    assert Qwen2Config(**derived).layer_types == config.layer_types
    remove_layers(model, [1, 2])
    assert model.model.has_sliding_layers is False and model.config.layer_types == [FULL]


def test_skip_layers_restores_the_model_even_after_an_error(ids):
    model = tiny("llama")
    before = logits(model, ids)
    with pytest.raises(RuntimeError), skip_layers(model, [0, 1, 2, 3]):
        assert not torch.equal(logits(model, ids), before)
        raise RuntimeError("inside")
    assert torch.equal(logits(model, ids), before)
    assert all(not layer._forward_hooks for layer in decoder_layers(model))


def test_removing_nothing_changes_nothing():
    model = tiny("llama")
    assert remove_layers(model, []) == []
    assert num_layers(model) == 4 and not hasattr(model.config, ORIGINAL_LAYERS_KEY)


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([4], "layer index 4 is out of range; this model has 4 layers, allowed: 0..3"),
        ([-1], "layer index -1 is out of range"),
        ([1, 1], "layer index 1 is given more than once"),
        ([0, 1, 2, 3], "removing 4 of 4 layers would leave none"),
        (["1"], "layer index '1' is not an integer"),
        ([True], "layer index True is not an integer"),
    ],
)
def test_bad_indices_are_refused_in_one_line_and_change_nothing(indices, message, ids):
    model = tiny("llama")
    before = logits(model, ids)
    with pytest.raises(UsageError, match=message) as error:
        remove_layers(model, indices)
    assert "\n" not in str(error.value)
    assert num_layers(model) == 4 and model.config.num_hidden_layers == 4
    assert torch.equal(logits(model, ids), before)
    if message.startswith("removing"):
        return
    with pytest.raises(UsageError, match=message), skip_layers(model, indices):
        pass


def test_unsupported_models_are_refused_with_the_supported_list():
    torch.manual_seed(0)
    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4))
    for model, name in [(bloom, "unsupported architecture 'bloom'"), (torch.nn.Linear(2, 2), "Linear is not")]:
        with pytest.raises(UsageError, match=name) as error:
            remove_layers(model, [0])
        assert "supported: gemma2, gemma3_text, gpt2, gpt_neox, llama" in str(error.value)
        assert "\n" not in str(error.value)
        with pytest.raises(UsageError, match=name):
            decoder_layers(model)


def test_gpt2_with_layer_dependent_attention_scale_is_refused():
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, scale_attn_by_inverse_layer_idx=True)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UsageError, match="scale_attn_by_inverse_layer_idx"):
        remove_layers(model, [1])
    assert num_layers(model) == 4


def test_original_indices_of_a_plain_config():
    config = LlamaConfig(**_LLAMA_LIKE)
    assert original_indices(config) == [0, 1, 2, 3]
    setattr(config, ORIGINAL_LAYERS_KEY, [0, 5])
    assert original_indices(config) == [0, 5]
    assert isinstance(config, PretrainedConfig)
