"""Everything in a merged model directory besides the weights: config, tokenizer, generation config, provenance.

Files are copied, not loaded and saved again, so the merged model carries exactly the
tokenizer and chat template the adapter was trained with; the parity check then loads them
from the output, as any user of the merged model will.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ftune.artifacts.ownership import write_json
from ftune.artifacts.runs import package_versions
from ftune.errors import FtuneError
from ftune.merge.plan import Plan
from ftune.merge.source import Source

MERGE_FILE = "merge.json"  # what made this directory; also how `ftune chat` recognises a merged model
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def write_config(config: dict, out: Path, dtype: str, *, untie: bool, classifier: str | None = None) -> None:
    """The base's config.json, edited rather than rebuilt, so custom fields and auto_map survive;
    a reward model's names its sequence-classification class and its one label."""
    config = dict(config)
    if classifier is not None:
        config.update({"architectures": [classifier], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}})
    # transformers 5 reads `dtype`; 4.x (what many serving stacks pin) reads `torch_dtype`.
    config["dtype"] = dtype
    config["torch_dtype"] = dtype
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    write_json(out / "config.json", config)


def copy_support_files(src: Source, out: Path) -> None:
    """Tokenizer and chat template, generation config (the run's, as trained), and remote code if any."""
    from transformers import AutoConfig, GenerationConfig

    base = Path(src.base_path)
    tokenizer_dir = src.adapter_dir if (src.adapter_dir / "tokenizer_config.json").is_file() else base
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
    if (tokenizer_dir / "additional_chat_templates").is_dir():
        shutil.copytree(tokenizer_dir / "additional_chat_templates", out / "additional_chat_templates")
    if not (out / "tokenizer_config.json").is_file():
        raise FtuneError(f"no tokenizer in {src.adapter_dir} or {base} (tokenizer_config.json)")
    # The run's generation config stops at the chat template's end-of-turn token; the base's may not.
    for folder in (src.adapter_dir, base):
        if (folder / "generation_config.json").is_file():
            shutil.copyfile(folder / "generation_config.json", out / "generation_config.json")
            break
    else:
        model_config = AutoConfig.from_pretrained(base, trust_remote_code=src.trust_remote_code)
        GenerationConfig.from_model_config(model_config).save_pretrained(out)
    if src.base_config.get("auto_map"):  # copied, not run: loading the merged model still asks for trust
        for code in base.glob("*.py"):
            shutil.copyfile(code, out / code.name)


def write_provenance(src: Source, plan: Plan, out: Path, *, onto: str, dtype: str, rounded_base: bool) -> None:
    """merge.json: what was merged onto what, how, and with which package versions."""
    from ftune import __version__

    write_json(
        out / MERGE_FILE,
        {
            "ftune_version": __version__,
            "stage": "merge",
            "source": str((src.run_dir or src.adapter_dir).resolve()),
            "adapter": str(src.adapter_dir.resolve()),
            "base_model": src.base_path,
            "dtype": dtype,
            "onto": "quantized" if rounded_base else "original",
            "onto_requested": onto,
            "quantization": src.quantization.model_dump() if src.quantization is not None else None,
            "adapted_weights": len(plan.lora) + len(plan.ia3),
            "replaced_weights": sorted(plan.replace),
            "rounded_through_4bit": len(plan.rounded),
            "untied": plan.untied,
            "versions": package_versions(),
        },
    )
