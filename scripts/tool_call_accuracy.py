"""Held-out tool-call accuracy: does a model call the right function with the right arguments?

    python scripts/tool_call_accuracy.py recipes/demo/tools.yaml demo runs/demo-tools

For every held-out conversation (the recipe's data.eval, or --data) the model is given the
conversation up to its first assistant turn that calls a tool, rendered with the recipe's chat
template and tools as a server renders it (generation prompt included), and answers greedily.
The call it writes (<tool_call>{"name": ..., "arguments": {...}}</tool_call>, the Hermes/Qwen
form the demo template uses) must equal the expected one exactly: the same function name and
the same arguments as JSON objects.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def requests(recipe, base_dir: Path, data: str | None):
    from ftune.data.conversation import source_tools
    from ftune.data.formats import convert
    from ftune.data.sources import read_source

    source = recipe.data.eval[0] if data is None else None
    rows, _ = read_source(data or source.path, base_dir=base_dir if data is None else Path.cwd())
    tools = source_tools(source.tools if source else recipe.data.train[0].tools, "tools")
    out = []
    for row in rows:
        chat = convert(row.data, "messages", tools=tools)
        first = next((i for i, m in enumerate(chat.messages) if m.get("tool_calls")), None)
        if first is not None:
            call = chat.messages[first]["tool_calls"][0]["function"]
            out.append((chat.messages[:first], chat.tools, call["name"], call["arguments"], row.place))
    return out


def score(spec: str, recipe, base_dir: Path, cases, max_new_tokens: int) -> tuple[int, int, list[str]]:
    import torch

    from ftune.commands import chat
    from ftune.data.rendering import formatter_for

    model = chat.load(chat.resolve(spec))
    formatter = formatter_for(model.tokenizer, recipe.data, base_dir=base_dir)  # the recipe's template, for base and run alike
    exact = named = 0
    misses = []
    for messages, tools, name, arguments, place in cases:
        text = formatter.render(formatter.template_messages(messages)[0], add_generation_prompt=True, tools=tools)
        inputs = model.tokenizer(text, add_special_tokens=formatter.prepend_bos, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=model.generation.eos_token_id, pad_token_id=model.tokenizer.pad_token_id)
        answer = model.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
        found = CALL.search(answer)
        try:
            call = json.loads(found.group(1)) if found else None
        except json.JSONDecodeError:
            call = None
        got_name = call.get("name") if isinstance(call, dict) else None
        named += got_name == name
        if got_name == name and call.get("arguments") == arguments:
            exact += 1
        elif len(misses) < 3:
            misses.append(f"{place}: expected {name}({json.dumps(arguments)}), got {answer.split(formatter.end_of_turn)[0][:120]!r}")
    return exact, named, misses


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("models", nargs="+", help="a run directory, 'demo', a model directory, ...")
    parser.add_argument("--data", help="held-out conversations (default: the recipe's data.eval)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, help="score only the first N requests")
    args = parser.parse_args(argv)

    from ftune.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    base_dir = args.recipe.resolve().parent
    cases = requests(recipe, base_dir, args.data)[: args.limit]
    print(f"{len(cases)} held-out requests")
    for spec in args.models:
        exact, named, misses = score(spec, recipe, base_dir, cases, args.max_new_tokens)
        print(f"{spec}: exact tool call (name + arguments) {exact}/{len(cases)} = {exact / max(len(cases), 1):.0%}; "
              f"right function {named}/{len(cases)}")
        for line in misses:
            print(f"  miss {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
