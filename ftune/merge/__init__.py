"""Merge: fold a LoRA, DoRA, VeRA or IA3 adapter into its base model, write a plain Hugging Face model, and prove it.
Prompt and prefix tuning have no weights to fold (source.refuse_unmergeable says so).

`command.py` is the command (`ftune merge`) and reads top to bottom. The steps it calls:

- `source.py`     the adapter and its base, from a run, a checkpoint's adapter or a bare adapter
- `plan.py`       every output tensor checked against the base's headers; tied and 4-bit weights
- `arithmetic.py` LoRA, rsLoRA, DoRA, VeRA and IA3 on one weight in float32; QLoRA's 4-bit rounding
- `writer.py`     streams merged tensors into safetensors shards, one tensor in memory at a time
- `support.py`    config.json, tokenizer, generation config, remote code files, merge.json
- `parity.py`     the merged model against the adapter, on the held-out prompts (ftune/modeling/compare.py),
                  and its report as a table
- `scores.py`     a reward model's parity: scores and the order of each held-out pair (a plain classification model)
"""

from ftune.merge.command import ParityError as ParityError
from ftune.merge.command import merge_to_dir as merge_to_dir
from ftune.merge.source import is_run_or_adapter as is_run_or_adapter
