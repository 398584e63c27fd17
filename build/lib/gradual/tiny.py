"""Tiny random models (`tiny:<arch>[:<layers>]`: `tiny:llama`, `tiny:gemma3:6`, ...) and their byte-level tokenizer,
built in-process from configs: every command accepts these names, so the tests and the smoke config exercise every
supported architecture through the real CLI without any download (`gradual.models.load_model` dispatches here).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tok_models
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from gradual.errors import UsageError

TINY_PREFIX = "tiny:"
TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt_neox", "gpt2", "opt")
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_HIDDEN, TINY_HEADS, TINY_KV_HEADS, TINY_INTERMEDIATE, TINY_MAX_POSITIONS = 64, 4, 2, 128, 256
TINY_INIT_RANGE = 0.1


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + 7 specials, no merges) built without any file or network.

    Every string round-trips exactly; `tokenizer(text)` prepends `<s>` like Llama; the chat template marks roles
    with `<|role|>` special tokens and ends every message with `</s>`.
    """
    vocab = {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(tok_models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", vocab["<s>"])])
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens=list(TINY_SPECIAL_TOKENS[4:]), model_max_length=TINY_MAX_POSITIONS)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _tiny_ids() -> dict[str, int]:
    ids = {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS)}
    return {"pad_token_id": ids["<pad>"], "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"]}


def _tiny_vocab_size() -> int:
    return len(TINY_SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())


def _gemma3_layer_types(num_layers: int) -> list[str]:
    """Every third layer full attention (1:2 instead of Gemma3's 1:5, so 4 layers already mix both kinds)."""
    types = ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(num_layers)]
    if "full_attention" not in types:
        types[-1] = "full_attention"
    return types


def tiny_config(arch: str, num_layers: int = 4) -> PretrainedConfig:
    """Config of a tiny model (hidden 64, 4 heads, 2 KV heads where supported, FFN 128, 256 positions), no dropout."""
    if arch not in TINY_ARCHS:
        raise UsageError(f"tiny architecture {arch!r} is unknown; choose one of {', '.join(TINY_ARCHS)}")
    if num_layers < 1:
        raise UsageError(f"tiny model layer count {num_layers} is invalid; it must be >= 1")
    head_dim = TINY_HIDDEN // TINY_HEADS
    # initializer_range 0.1 (HF default 0.02): logits less flat and layers less alike, so greedy ties are rarer
    # and importance metrics see distinct layers.
    common = dict(vocab_size=_tiny_vocab_size(), initializer_range=TINY_INIT_RANGE, **_tiny_ids())
    llama_like = dict(hidden_size=TINY_HIDDEN, num_hidden_layers=num_layers, num_attention_heads=TINY_HEADS,
                      num_key_value_heads=TINY_KV_HEADS, intermediate_size=TINY_INTERMEDIATE,
                      max_position_embeddings=TINY_MAX_POSITIONS, attention_dropout=0.0, **common)
    if arch in ("llama", "qwen2", "mistral"):
        kwargs = dict(llama_like)
    elif arch == "qwen3":
        kwargs = dict(llama_like, head_dim=head_dim)
    elif arch == "gemma2":
        kwargs = dict(llama_like, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=4)
    elif arch == "gemma3":
        arch = "gemma3_text"
        kwargs = dict(llama_like, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=4,
                      layer_types=_gemma3_layer_types(num_layers))
    elif arch == "phi3":
        kwargs = dict(llama_like, original_max_position_embeddings=TINY_MAX_POSITIONS, resid_pdrop=0.0,
                      embd_pdrop=0.0)
    elif arch == "gpt_neox":
        kwargs = dict(hidden_size=TINY_HIDDEN, num_hidden_layers=num_layers, num_attention_heads=TINY_HEADS,
                      intermediate_size=TINY_INTERMEDIATE, max_position_embeddings=TINY_MAX_POSITIONS,
                      attention_dropout=0.0, hidden_dropout=0.0, **common)
    elif arch == "gpt2":
        kwargs = dict(n_embd=TINY_HIDDEN, n_layer=num_layers, n_head=TINY_HEADS, n_inner=TINY_INTERMEDIATE,
                      n_positions=TINY_MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    else:  # opt
        kwargs = dict(hidden_size=TINY_HIDDEN, num_hidden_layers=num_layers, num_attention_heads=TINY_HEADS,
                      ffn_dim=TINY_INTERMEDIATE, word_embed_proj_dim=TINY_HIDDEN,
                      max_position_embeddings=TINY_MAX_POSITIONS, dropout=0.0, attention_dropout=0.0, **common)
    return AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str, num_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A deterministic random tiny model in eval mode; the global RNG state is left untouched."""
    config = tiny_config(arch, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.config.name_or_path = f"{TINY_PREFIX}{arch}:{num_layers}"
    return model.to(dtype).eval()


def parse_tiny(name: str) -> tuple[str, int]:
    """`tiny:<arch>[:<layers>]` → (arch, layers)."""
    parts = name[len(TINY_PREFIX):].split(":")
    if len(parts) > 2 or not parts[0]:
        raise UsageError(f"model name {name!r} is invalid; use tiny:<arch>[:<layers>] with arch in "
                         f"{', '.join(TINY_ARCHS)}")
    layers = 4
    if len(parts) == 2:
        if not parts[1].isdigit() or int(parts[1]) < 1:
            raise UsageError(f"layer count {parts[1]!r} in {name!r} is invalid; it must be a positive integer")
        layers = int(parts[1])
    if parts[0] not in TINY_ARCHS:
        raise UsageError(f"tiny architecture {parts[0]!r} is unknown; choose one of {', '.join(TINY_ARCHS)}")
    return parts[0], layers
