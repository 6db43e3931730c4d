"""`ftune export-gguf --report`: which quantization to ship, measured on the user's model and data.

"Q5_K_M is the best trade-off" is a rule of thumb; this measures it. Every exported type is
compared with the lossless GGUF (f16, bf16 or f32: the checkpoint's own precision) converted
from the same checkpoint in the same command:
- size: file bytes, and bits per weight (file bits / parameters, metadata included);
- held-out perplexity through llama.cpp, scored by `ftune eval`'s own GGUF loss
  (evaluate.gguf_loss) on data tokenized by `ftune eval`'s own reader (evaluate.eval_data),
  so `ftune eval MODEL FILE.gguf --data D` prints the same number for the same file;
- mean KL(source || type) and top-1 agreement of the next-token distributions at those same
  answer positions;
- tokens/s of greedy generation in llama.cpp on this machine: one fixed chat prompt, a fixed
  number of new tokens, the same threads for every type.
The pick is the smallest file whose perplexity stays within a budget over the source's.
Printed as a table; saved as FILE.report.json and FILE.report.png (size vs perplexity).
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftune.errors import FtuneError
from ftune.guards import textio

DEFAULT_BUDGET = 0.05
"""Perplexity a type may add over the lossless source's and still be picked: +5%."""
EVAL_MAX_LENGTH = 2048  # `ftune eval --max-length`'s default: the same truncation, the same perplexity
MIN_CONTEXT = 1024  # `ftune eval` loads a GGUF with at least this context: the same batches, the same logits
SPEED_TOKENS = 64
REPORT_KIND = "ftune export-gguf quantization report"


@dataclass(frozen=True)
class Request:
    """What `--report` asks for: the eval data (None: the run's own held-out split) and the budget."""

    data: Path | None = None
    budget: float = DEFAULT_BUDGET


@dataclass
class EvalData:
    """The held-out samples, tokenized once before any conversion, and the fixed prompt for speed."""

    eval_set: Any  # ftune.data.packing.Encoded
    tokenizer: Any
    source: str
    speed_prompt: list[int]


def request_from_options(report: bool, data: Path | None, ppl_budget: str | None) -> Request | None:
    """The command line's --report, --data and --ppl-budget as a Request (None: no report).

    --data and --ppl-budget only mean something to the report: alone, they are a mistake
    worth saying, not an option silently ignored.
    """
    if not report:
        for option, value in (("--data", data), ("--ppl-budget", ppl_budget)):
            if value is not None:
                raise FtuneError(f"{option} is for the quantization report, and --report is not given", place=option,
                                 hint="add --report, or drop " + option)
        return None
    return Request(data=data, budget=DEFAULT_BUDGET if ppl_budget is None else parse_budget(ppl_budget))


def parse_budget(text: str) -> float:
    """'5%' or '0.05' -> 0.05. A bare number above 1 is refused: '5' could mean 5% or +500%."""
    raw = str(text).strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw)
    except ValueError:
        value = math.nan
    value = value / 100 if percent else value
    if not math.isfinite(value) or value < 0:
        raise FtuneError(f"--ppl-budget {text!r} is not a non-negative number", place="--ppl-budget",
                         hint="e.g. 5% or 0.05: how much perplexity a type may add over the lossless source's")
    if not percent and value > 1:
        raise FtuneError(f"--ppl-budget {raw} reads as +{value:.0%} perplexity", place="--ppl-budget",
                         hint=f"write {raw}% for {raw} percent, or a fraction such as 0.05")
    return value


def report_paths(out: Path) -> tuple[Path, Path]:
    """FILE.report.json and FILE.report.png for --out FILE.gguf."""
    stem = Path(out).with_suffix("")
    return stem.with_name(stem.name + ".report.json"), stem.with_name(stem.name + ".report.png")


def check_paths(out: Path, *, overwrite: bool) -> tuple[Path, Path]:
    """The report's two paths, refused before any work if they hold something ftune may not replace.

    A report is replaced only with --overwrite, and only when its JSON is one this command
    wrote (it names its kind and its chart); a PNG without such a JSON beside it is the user's.
    """
    json_path, png_path = report_paths(out)
    previous = _read_json(json_path)
    ours = previous is not None and previous.get("kind") == REPORT_KIND
    for path in (json_path, png_path):
        if not path.exists() and not path.is_symlink():
            continue
        if not overwrite:
            raise FtuneError(f"{path} already exists", place="--out", hint="choose another --out, or pass --overwrite to replace the report")
        if not path.is_file() or not ours or (path == png_path and previous.get("chart") != png_path.name):
            raise FtuneError(f"{path} was not written by `ftune export-gguf --report`; ftune replaces only what it wrote",
                             place="--out", hint="move it away, or choose another --out")
    return json_path, png_path


def _read_json(path: Path) -> dict | None:
    try:
        data = textio.load_file(path)
    except FtuneError:
        return None
    return data if isinstance(data, dict) else None


def prepare(model: str, request: Request) -> EvalData:
    """The held-out samples, tokenized exactly as `ftune eval MODEL FILE.gguf [--data FILE]` does.

    Called before the conversion: a missing or malformed data file fails in seconds, not after it.
    """
    from ftune.artifacts.runs import RECIPE_FILE
    from ftune.commands import chat, evaluate
    from ftune.modeling.compare import held_out_prompts

    target = chat.resolve(model)
    held_out = None
    if request.data is None:
        if target.kind != "run" or not (Path(model).expanduser() / RECIPE_FILE).is_file():
            raise FtuneError(f"--report measures perplexity on held-out data, and {model} is not an ftune run whose recipe holds some out",
                             place="--report", hint="pass --data FILE (any format ftune reads), or export an ftune run directory: "
                                                    "its recipe's held-out split is used")
        held_out = evaluate.own_recipe([target], [])
    elif not Path(request.data).is_file():
        raise FtuneError(f"data file {request.data} does not exist", place="--data")
    _recipe, eval_set, tokenizer, source = evaluate.eval_data([target], held_out, request.data, EVAL_MAX_LENGTH, None, False)
    # The first built-in parity question in the model's chat template: the same prompt for every type.
    prompt = held_out_prompts(tokenizer, None, max_tokens=256)[0]
    return EvalData(eval_set, tokenizer, source, prompt)


# --------------------------------------------------------------------------- measuring


def measure(files: dict[str, Path], source: Path, source_type: str, data: EvalData, request: Request, *,
            model: str, say: Callable[[str], None]) -> dict:
    """The report for `files` ({type: published GGUF}) against the lossless `source` GGUF."""
    from ftune.artifacts.runs import package_versions
    from ftune.commands import chat
    from ftune.commands.evaluate import gguf_loss
    from ftune.gguf.verify import worker_threads

    parameters = parameter_count(source)
    context = max(int(data.eval_set.lengths().max()), MIN_CONTEXT)
    threads = worker_threads()
    tokens = data.eval_set.trained_tokens()
    say(f"report: {data.source}: {len(data.eval_set)} samples, {tokens:,} answer tokens, through the {source_type} source "
        f"and {', '.join(files)}")

    def load(path: Path) -> Any:
        return chat.load(chat.Target(str(path), "gguf", Path(path)), logits=True, context=context)

    reference = load(source)
    try:
        base = gguf_loss(reference, data.eval_set, data.tokenizer)
        source_row = _row(source_type, source, base, parameters) | {"mean_kl": 0.0, "max_kl": 0.0, "top1_agreement": 1.0}
        source_row |= generation_speed(source, data.speed_prompt, SPEED_TOKENS, threads)
        rows = []
        for name, path in files.items():
            say(f"report: measuring {name}")
            compared = _Agreement(reference.llm)
            loaded = load(path)
            try:
                scored = gguf_loss(loaded, data.eval_set, data.tokenizer, each=compared.add)
            finally:
                loaded.close()
            rows.append(_row(name, path, scored, parameters) | compared.summary()
                        | generation_speed(path, data.speed_prompt, SPEED_TOKENS, threads))
    finally:
        reference.close()

    limit = source_row["perplexity"] * (1 + request.budget) if source_row["perplexity"] is not None else None
    for row in rows:
        row["perplexity_change"] = _change(row["perplexity"], source_row["perplexity"])
        row["within_budget"] = limit is not None and row["perplexity"] is not None and row["perplexity"] <= limit
    return {
        "kind": REPORT_KIND,
        "model": model,
        "data": {"source": data.source, "samples": len(data.eval_set), "answer_tokens": tokens},
        "parameters": parameters,
        "source": source_row,
        "types": rows,
        "budget": {"ppl_budget": request.budget, "max_perplexity": limit},
        "pick": pick(rows),
        "speed": {"threads": threads, "prompt_tokens": len(data.speed_prompt), "new_tokens": SPEED_TOKENS, "sampling": "greedy"},
        "versions": package_versions(),
    }


def pick(rows: list[dict]) -> str | None:
    """The smallest file among the types within the budget (fewer bits first, then lower perplexity)."""
    fits = [r for r in rows if r["within_budget"]]
    return min(fits, key=lambda r: (r["bytes"], r["perplexity"]))["type"] if fits else None


def parameter_count(path: Path) -> int:
    """Weights in a GGUF file, counted over its tensors (a tied embedding once, as it is stored)."""
    import gguf

    return sum(int(t.n_elements) for t in gguf.GGUFReader(str(path)).tensors)


def _row(name: str, path: Path, scored: dict, parameters: int) -> dict:
    size = Path(path).stat().st_size
    return {
        "type": name,
        "file": str(path),
        "bytes": size,
        "bits_per_weight": size * 8 / parameters,
        "eval_loss": _finite(scored["eval_loss"]),
        "perplexity": _finite(scored["eval_perplexity"]),
        "eval_tokens": scored["eval_tokens"],
    }


def _finite(value: float) -> float | None:
    # A broken file can score NaN; JSON has no NaN, and such a type can never be the pick.
    return float(value) if math.isfinite(value) else None


def _change(value: float | None, base: float | None) -> float | None:
    return value / base - 1 if value is not None and base else None


class _Agreement:
    """KL(source || type) and top-1 agreement at the answer positions `gguf_loss` scores."""

    def __init__(self, source_llm: Any):
        self.source_llm = source_llm
        self.kls: list[Any] = []
        self.agree = 0
        self.positions = 0

    def add(self, ids: list[int], logits: Any, keep: Any) -> None:
        import numpy as np

        from ftune.gguf.verify import _kl

        self.source_llm.reset()
        self.source_llm.eval(ids)
        mask = keep.numpy()
        expected = np.array(self.source_llm.scores[: len(ids)], dtype=np.float32)[mask]
        got = logits.numpy()[mask]
        self.kls.append(_kl(expected, got))
        self.agree += int((expected.argmax(-1) == got.argmax(-1)).sum())
        self.positions += int(mask.sum())

    def summary(self) -> dict:
        import numpy as np

        kl = np.concatenate(self.kls) if self.kls else np.zeros(1)
        return {"mean_kl": _finite(float(kl.mean())), "max_kl": _finite(float(kl.max())),
                "top1_agreement": self.agree / max(self.positions, 1), "positions": self.positions}


def generation_speed(path: Path, prompt: list[int], n_tokens: int, threads: int) -> dict:
    """Greedy tokens/s in llama.cpp: `n_tokens` new tokens after `prompt` (end-of-text ignored), and prompt tokens/s."""
    from ftune.gguf.verify import captured_llama_log, require_llama_cpp

    llama_cpp = require_llama_cpp("measuring generation speed")
    with captured_llama_log():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n_tokens + 8, n_batch=max(len(prompt), 8),
                              n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        # A first short pass pages the weights in from disk: a cost paid once per load, not per token.
        warm = llm.generate(prompt, temp=0.0, top_k=1)
        list(itertools.islice(warm, 4))
        warm.close()
        llm.reset()
        started = time.perf_counter()
        stream = llm.generate(prompt, temp=0.0, top_k=1)
        next(stream)  # the prompt's pass and the first token
        first = time.perf_counter()
        for _ in itertools.islice(stream, n_tokens - 1):
            pass
        done = time.perf_counter()
        stream.close()
    finally:
        llm.close()
    return {"tokens_per_s": (n_tokens - 1) / max(done - first, 1e-9), "prompt_tokens_per_s": len(prompt) / max(first - started, 1e-9)}


# --------------------------------------------------------------------------- showing and saving


def render(report: dict) -> str:
    """The report as a plain-text table and the pick, for the terminal."""
    from rich.table import Table

    from ftune.modeling.compare import render_plain

    data, source = report["data"], report["source"]
    table = Table(title=f"which quantization to ship: {data['samples']} held-out samples, {data['answer_tokens']:,} answer tokens")
    for column in ("type", "MiB", "bits/w", "perplexity", "vs source", "mean KL", "top-1", "tok/s", ""):
        table.add_column(column, justify="left" if column in ("type", "") else "right", no_wrap=True)
    table.add_row(f"{source['type']} source", *_cells(source), "-", "-", "-", f"{source['tokens_per_s']:.1f}", "")
    for row in report["types"]:
        mark = "<- pick" if row["type"] == report["pick"] else ("" if row["within_budget"] else "over budget")
        table.add_row(row["type"], *_cells(row), _number(row["perplexity_change"], "+.1%"), _number(row["mean_kl"], ".2e"),
                      f"{row['top1_agreement']:.1%}", f"{row['tokens_per_s']:.1f}", mark)
    budget = report["budget"]
    within = f"within +{budget['ppl_budget']:.1%} of the {source['type']} source's perplexity"
    if report["pick"]:
        verdict = f"pick: {report['pick']}, the smallest file {within} (at most {budget['max_perplexity']:.3f})"
    else:
        closest = min((r for r in report["types"] if r["perplexity"] is not None), key=lambda r: r["perplexity"], default=None)
        verdict = f"no type is {within}" + (f"; the closest is {closest['type']} ({closest['perplexity_change']:+.1%})" if closest else "")
    speed = report["speed"]
    threads = f"{speed['threads']} thread" + ("s" if speed["threads"] != 1 else "")
    note = (f"mean KL and top-1: next-token distributions against the {source['type']} source at the same answer tokens; "
            f"tok/s: greedy generation, {speed['new_tokens']} new tokens after a {speed['prompt_tokens']}-token prompt, "
            f"{threads}, on this machine")
    return render_plain(table, verdict, note)


def _cells(row: dict) -> list[str]:
    return [f"{row['bytes'] / 2**20:.1f}", f"{row['bits_per_weight']:.2f}", _number(row["perplexity"], ".3f")]


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def write(report: dict, json_path: Path, png_path: Path) -> list[Path]:
    """The chart, then the JSON that names it; each renamed into place only when complete."""
    from ftune.artifacts.ownership import write_json

    write_chart(report, png_path)
    report, nulls = textio.nulled(report)  # a NaN figure is written as null, and said
    if nulls:
        sys.stderr.write(textio.nulls_note(nulls) + f" in {json_path}\n")
    write_json(json_path, report | {"chart": png_path.name})
    return [json_path, png_path]


def write_chart(report: dict, path: Path) -> None:
    """Size against perplexity: the source, each type, the budget line and the pick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ftune.artifacts.ownership import atomic_file

    source = report["source"]
    rows = [r for r in report["types"] if r["perplexity"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.plot([r["bytes"] / 2**20 for r in rows], [r["perplexity"] for r in rows], "o", label="exported types")
    for r in rows:
        ax.annotate(r["type"], (r["bytes"] / 2**20, r["perplexity"]), textcoords="offset points", xytext=(5, 5))
    if source["perplexity"] is not None:
        ax.plot([source["bytes"] / 2**20], [source["perplexity"]], "s", color="gray", label=f"{source['type']} source")
        ax.annotate(f"{source['type']} source", (source["bytes"] / 2**20, source["perplexity"]), textcoords="offset points",
                    xytext=(-10, 8), ha="right")
    if report["budget"]["max_perplexity"] is not None:
        ax.axhline(report["budget"]["max_perplexity"], linestyle="--", color="gray",
                   label=f"budget: +{report['budget']['ppl_budget']:.1%} over the source")
    chosen = next((r for r in rows if r["type"] == report["pick"]), None)
    if chosen is not None:
        ax.plot([chosen["bytes"] / 2**20], [chosen["perplexity"]], "o", markersize=14, markerfacecolor="none",
                markeredgecolor="green", markeredgewidth=2, label=f"pick: {chosen['type']}")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("held-out perplexity (llama.cpp)")
    ax.set_title(f"{Path(report['model']).name}: {report['data']['answer_tokens']:,} answer tokens", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_file(path, "wb") as handle:
            fig.savefig(handle, format="png")
    finally:
        plt.close(fig)
