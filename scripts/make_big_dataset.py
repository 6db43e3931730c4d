"""Write a large alpaca-style SFT set (JSONL) by recombining the real rows of ../shared/data/, for the data benchmark.

    python scripts/make_big_dataset.py --out /tmp/sft-1m.jsonl                  # 1,000,000 rows
    python scripts/make_big_dataset.py --rows 100000 --out /tmp/sft-100k.jsonl --seed 7

Every row is `{"instruction", "input", "output"}` built from the 2,000 Stanford Alpaca rows
and the 175 self-instruct seed tasks (their instances) in ../shared/data/ (CC BY-NC 4.0, see
its README): the set is not shipped with ftune, only generated where that folder exists.
The rows keep the sources' texture (about 60% with an empty input, answers from one word to
several paragraphs, code and lists kept line by line) with variation, so that a million rows
are not 2,175 rows repeated:

- original (3%): a source row as it is; large sets carry exact repeats too;
- reworded (27%): the instruction in one of a few dozen framings, the answer's sentences kept;
- swapped input (20%): an instruction that takes an input, given another row's input;
- recombined answer (35%): some sentences of the answer replaced by, or followed by,
  sentences of other answers;
- multi-part (5%): two to four instructions asked as one numbered task, answered in turn
  (the long tail: these often pass 512 tokens);
- self-instruct instance (10%): a seed task with one of its instances;
- on top of any of these, 15% of rows get their numbers changed (a numbered variant).

Deterministic: the same --seed gives the same file, and a shorter run is a prefix of a
longer one with the same seed (one random stream, drawn row by row). Memory stays bounded:
only the source rows are held; rows are written as they are made, to OUT.partial, renamed
to OUT at the end (an interrupted run leaves no half-written OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
ALPACA, SELF_INSTRUCT = "alpaca_2k.json", "self_instruct_seed_tasks.jsonl"

# Share of each kind of row; the rest of the module turns a kind into a row.
KINDS = {"original": 0.03, "reworded": 0.27, "swapped_input": 0.20, "recombined": 0.35, "multi_part": 0.05, "self_instruct": 0.10}
NUMBERED_SHARE = 0.15
FRAMINGS = [
    "{i}", "Please {l}", "{i} Keep it brief.", "{i} Explain your reasoning.", "Task {n}: {i}", "{i} (variant {n})",
    "Could you {l}", "I need help with this. {i}", "{i} Answer in plain language.", "Question {n}. {i}",
    "Here is a request: {i}", "{i} Be specific.", "Quick one: {l}", "{i} Use complete sentences.",
    "As an assistant, {l}", "{i} Thanks!", "Exercise {n}: {i}", "{i} Give a clear answer.", "Hi! {i}",
    "For a class assignment: {l}", "{i} Please be concise.", "Step {n}. {i}", "{i} Think it through first.",
    "My teacher asked me this: {l}", "{i} Write it for a beginner.", "Prompt #{n}: {i}",
]
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
NUMBER = re.compile(r"\b\d{1,6}\b")


def load_sources(folder: Path) -> tuple[list[dict], list[dict]]:
    """(alpaca rows, self-instruct instances as alpaca rows); a clear error when the folder or a file is missing."""
    missing = [name for name in (ALPACA, SELF_INSTRUCT) if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"make_big_dataset: {', '.join(str(folder / m) for m in missing)} not found. The generator recombines "
                         f"the real rows of the project's shared data folder ({ALPACA}, {SELF_INSTRUCT}; see its README), "
                         "which a clone of the repository does not have; name another copy with --source FOLDER.")
    alpaca = [{k: str(r.get(k) or "") for k in ("instruction", "input", "output")} for r in json.loads((folder / ALPACA).read_text())]
    tasks = []
    for line in (folder / SELF_INSTRUCT).read_text().splitlines():
        if line.strip():
            task = json.loads(line)
            tasks += [{"instruction": task["instruction"], "input": i.get("input") or "", "output": i.get("output") or ""}
                      for i in task["instances"]]
    alpaca = [r for r in alpaca if r["instruction"].strip() and r["output"].strip()]
    return alpaca, [t for t in tasks if t["instruction"].strip() and t["output"].strip()]


def units(text: str) -> tuple[list[str], str]:
    """An answer cut where it can be recombined: lines for code and lists, sentences for prose; and the joiner."""
    if "\n" in text:
        return [line for line in text.split("\n") if line.strip()] or [text], "\n"
    return SENTENCE_END.split(text), " "


class Generator:
    def __init__(self, alpaca: list[dict], tasks: list[dict], seed: int):
        self.rng = random.Random(seed)
        self.rows, self.tasks = alpaca, tasks
        self.with_input = [r for r in alpaca if r["input"].strip()] or alpaca
        self.prose = [r for r in alpaca if "\n" not in r["output"]] or alpaca  # sentences to lend to other prose answers
        self.cut = {id(r): units(r["output"]) for r in alpaca}
        self.kinds, self.weights = list(KINDS), list(KINDS.values())
        self.serial = 0

    def row(self) -> dict:
        rng = self.rng
        self.serial += 1
        kind = rng.choices(self.kinds, self.weights)[0]
        base = rng.choice(self.rows)
        if kind == "original":
            out = dict(base)
        elif kind == "reworded":
            out = {"instruction": self.frame(base["instruction"]), "input": base["input"], "output": base["output"]}
        elif kind == "swapped_input":
            base = rng.choice(self.with_input)
            out = {"instruction": base["instruction"], "input": rng.choice(self.with_input)["input"], "output": self.recombine(base)}
        elif kind == "recombined":
            out = {"instruction": self.frame(base["instruction"]) if rng.random() < 0.5 else base["instruction"],
                   "input": base["input"], "output": self.recombine(base)}
        elif kind == "multi_part":
            parts = [base] + [rng.choice(self.rows) for _ in range(rng.randint(1, 3))]
            asks = "\n".join(f"{k}. {p['instruction']}" + (f"\n   {p['input']}" if p["input"] else "") for k, p in enumerate(parts, 1))
            out = {"instruction": "Answer each of the following in turn.", "input": asks,
                   "output": "\n\n".join(f"{k}. {p['output']}" for k, p in enumerate(parts, 1))}
        else:
            task = rng.choice(self.tasks)
            out = {"instruction": self.frame(task["instruction"]) if rng.random() < 0.5 else task["instruction"],
                   "input": task["input"], "output": task["output"]}
        if rng.random() < NUMBERED_SHARE:
            out = {k: NUMBER.sub(lambda m: str(rng.randint(0, 10 ** len(m.group()) - 1)), v) for k, v in out.items()}
        return out

    def frame(self, instruction: str) -> str:
        framing = self.rng.choice(FRAMINGS)
        lower = instruction[:1].lower() + instruction[1:]
        return framing.format(i=instruction, l=lower, n=self.serial)

    def recombine(self, base: dict) -> str:
        """The base answer with some sentences swapped for, or followed by, other answers' sentences."""
        rng = self.rng
        pieces, joiner = self.cut[id(base)]
        pieces = list(pieces)
        if joiner == " " and len(pieces) > 1:
            for k in range(len(pieces)):
                if rng.random() < 0.3:
                    lender, _ = self.cut[id(rng.choice(self.prose))]
                    pieces[k] = rng.choice(lender)
        if rng.random() < 0.35:
            lender, _ = self.cut[id(rng.choice(self.prose))]
            start = rng.randrange(len(lender))
            pieces += lender[start: start + rng.randint(1, 3)]
        return joiner.join(pieces)


def write(out: Path, rows: int, seed: int, source: Path) -> None:
    alpaca, tasks = load_sources(source)
    generator = Generator(alpaca, tasks, seed)
    partial = out.with_name(out.name + ".partial")
    started = time.perf_counter()
    with open(partial, "w", encoding="utf-8", buffering=1 << 20) as handle:
        for n in range(1, rows + 1):
            handle.write(json.dumps(generator.row(), ensure_ascii=False) + "\n")
            if n % 200_000 == 0:
                print(f"  {n:,} rows ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    os.replace(partial, out)
    print(f"wrote {rows:,} rows to {out} ({out.stat().st_size / 2**20:,.0f} MiB, {time.perf_counter() - started:.1f} s; "
          f"from {len(alpaca):,} alpaca rows and {len(tasks):,} self-instruct instances, seed {seed})", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to write (default 1,000,000)")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--source", type=Path, default=SHARED_DATA, help=f"the shared data folder (default {SHARED_DATA})")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists; pass --force to replace it")
    if not args.out.parent.is_dir():
        parser.error(f"{args.out.parent} is not a folder")
    write(args.out, args.rows, args.seed, args.source)


if __name__ == "__main__":
    main()
