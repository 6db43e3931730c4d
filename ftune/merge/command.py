"""`ftune merge`: fold a LoRA, DoRA, VeRA or IA3 adapter into its base model, shard by shard, and prove it.

`merge_to_dir` reads top to bottom:
1. source: find the adapter and its base; a run directory records both (and whether the base
   was 4-bit during training), a bare adapter names its base in adapter_config.json.
2. the output: refused, before any weight is read, unless it is new or (with --overwrite)
   ftune's own output; never the current directory or a directory holding the inputs.
3. plan: read the adapter, check every tensor against the base's shapes, decide which tied
   weights must be written apart and which weights QLoRA training saw rounded to 4 bits.
4. write: stream the merged tensors into shards, then config, tokenizer and merge.json, all
   in a directory beside the output that is renamed into place only when complete.
5. verify: run the same prompts through the adapter loaded the way it was trained and
   through the merged directory loaded by plain transformers; compare logits and greedy
   continuations, write parity.json, and fail when they differ by more than the tolerance.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

from ftune.artifacts.ownership import atomic_dir, check_target, write_json
from ftune.errors import FtuneError
from ftune.guards import textio
from ftune.merge.parity import render_report, verify_parity
from ftune.merge.plan import plan_merge
from ftune.merge.scores import render_scores, verify_scores
from ftune.merge.source import DTYPES, Source, config_dtype, read_source
from ftune.merge.support import copy_support_files, write_config, write_provenance
from ftune.merge.writer import MAX_SHARD_BYTES, write_weights
from ftune.modeling import models
from ftune.modeling.compare import read_prompts

ONTO = ("quantized", "original")
PARITY_FILE = "parity.json"


class ParityError(FtuneError):
    """The merged model was written but does not behave like the adapter."""

    exit_code = 3


def merge_to_dir(
    source: Path,
    out: Path,
    *,
    base: str | None = None,
    dtype: str | None = None,
    onto: str = "quantized",
    verify: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """Merge the adapter of `source` (a run or adapter directory) into its base and write a model to `out`.

    `trust_remote_code` is the user's own choice (the command line's); nothing read from
    `source` turns it on. Returns the parity report ({} with verify=False). Raises FtuneError
    for inputs that do not fit, and ParityError (after writing) when the merged model does
    not behave like the adapter.
    """
    say = echo or (lambda _text: None)
    models.quiet_libraries()  # library notices ftune has handled (peft's deprecated alias, bitsandbytes' optional kernel)
    onto = _choice(onto, ONTO, "--onto")
    requested_dtype = DTYPES[_choice(dtype, DTYPES, "--dtype")] if dtype else None
    src = read_source(Path(source), base, trust_remote_code=trust_remote_code)
    out_dtype = requested_dtype or config_dtype(src.base_config)
    if verify and src.prompts_file is not None:
        read_prompts(src.prompts_file)  # a damaged line fails now, not after the weights are written
    inputs = _inputs(src)
    check_target(Path(out), kind="merged-model", overwrite=overwrite, inputs=inputs, option="--out")  # atomic_dir checks again when it writes
    rounded_base = src.quantization is not None and onto == "quantized"

    plan = plan_merge(src, rounded_base=rounded_base)
    say(
        f"merging {src.adapter_dir} into {src.base_path}"
        + (" (base rounded through 4 bits, as in training)" if rounded_base else "")
        + f" as {out_dtype}: {len(plan.lora) + len(plan.ia3)} adapted weights, {len(plan.replace)} replaced"
    )
    with atomic_dir(Path(out), kind="merged-model", overwrite=overwrite, inputs=inputs, option="--out") as tmp:
        write_weights(plan, tmp, out_dtype, max_shard_bytes, say)
        write_config(src.base_config, tmp, out_dtype, untie=bool(plan.untied), classifier=plan.classifier)
        copy_support_files(src, tmp)
        write_provenance(src, plan, tmp, onto=onto, dtype=out_dtype, rounded_base=rounded_base)
        report: dict = {}
        if verify:
            report = (verify_scores if src.scores else verify_parity)(src, tmp, out_dtype, rounded_base=rounded_base, say=say)
            report, nulls = textio.nulled(report)  # a NaN logit difference is written as null, and said
            if nulls:
                say(textio.nulls_note(nulls))
            write_json(tmp / PARITY_FILE, report)
    if report:
        say((render_scores if src.scores else render_report)(report))
        if not report["passed"]:
            raise ParityError(
                "the merged model does not behave like the adapter (outside tolerance)",
                place=str(Path(out) / PARITY_FILE),
                hint="16 bits lose precision: compare with --dtype fp32"
                if report["precision"] != "float32"
                else "in float32 this points to a broken adapter or base file, or a bug in ftune; please report it with parity.json",
            )
    say(f"wrote {out}")
    return report


def _inputs(src: Source) -> list[tuple[str, Path]]:
    """What the merge reads: the output may be none of these, nor a folder holding one."""
    inputs = [("the adapter being merged", src.adapter_dir), ("the base model", Path(src.base_path))]
    if src.run_dir is not None:
        inputs.append(("the run being merged", src.run_dir))
    return inputs


def _choice(value: str, choices, option: str) -> str:
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    raise FtuneError(
        f"{option} must be one of {', '.join(choices)}, not {value!r}" + (f" (did you mean {close[0]}?)" if close else "")
    )
