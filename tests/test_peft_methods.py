"""The other parameter-efficient methods: lora_plus, vera, ia3, prompt_tuning and prefix_tuning.

Each trains on the tiny model through `ftune sft` (eval loss falls), saves an adapter that plain
peft loads with the same log-probs as ftune's scorer, resumes after kill -9 to the same adapter,
and merges with a passing parity report (lora_plus, vera, ia3) or is refused, with nothing
written, by `ftune merge` and `ftune export-gguf` (prompt and prefix tuning: virtual tokens are
not weights). `ftune inspect` counts the trainable parameters peft counts.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from helpers import invoke, snapshot
from helpers import adapter as saved_adapter
from helpers import kill_9_after_checkpoint, start

from ftune.stages import sft

ROWS = [
    {"messages": [{"role": "user", "content": f"What is the code word {i}?"}, {"role": "assistant", "content": "The code word is pineapple."}]}
    for i in range(24)
]
STEPS = 6
METHODS = {
    # dropout makes the restored RNG state matter on resume
    "lora_plus": "adapter: {method: lora_plus, r: 8, alpha: 16, dropout: 0.1, lora_plus_ratio: 8}\n",
    "vera": "adapter: {method: vera, r: 32, dropout: 0.1}\n",
    "ia3": "adapter: {method: ia3}\n",
    "prompt_tuning": "adapter: {method: prompt_tuning, num_virtual_tokens: 8, init_text: 'The code word is'}\n",
    "prefix_tuning": "adapter: {method: prefix_tuning, num_virtual_tokens: 8}\n",
}
MERGEABLE = ("lora_plus", "vera", "ia3")
VIRTUAL = ("prompt_tuning", "prefix_tuning")


def write_recipe(folder: Path, model: Path, method: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"stage: sft\nbase_model: {{name: {model}}}\n"
        "data:\n  train: [{path: train.jsonl}]\n  eval_fraction: 0.25\n  max_length: 64\n"
        + ("  packing: false\n" if method in VIRTUAL else "")
        + METHODS[method]
        + f"training: {{learning_rate: 2.0e-2, batch_size: 2, max_steps: {STEPS}, eval_steps: 3, save_steps: 1, "
        "save_total_limit: 2, warmup_ratio: 0}\n"
        "output: {dir: run}\n"
    )
    return recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """One finished run per method (shared by the tests below)."""
    root = tmp_path_factory.mktemp("methods")
    return {method: sft.run(write_recipe(root / method, tiny_model_dir, method)) for method in METHODS}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def sample_batches(tokenizer_dir: Path):
    """Two samples (their ids) and the batches ftune makes of them: packed in one row, and padded one per row."""
    from transformers import AutoTokenizer

    from ftune.data.packing import Encoded, collate

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": "What is the code word 99?"},
                                            {"role": "assistant", "content": "The code word is pineapple."}], tokenize=False),
             "Once upon a time there was a code word."]
    samples = [tokenizer(t)["input_ids"] for t in texts]
    data = Encoded.from_lists([(ids, ids) for ids in samples])
    return samples, {"packed": collate(data, [[0, 1]], tokenizer.pad_token_id, packed=True),
                     "padded": collate(data, [[0], [1]], tokenizer.pad_token_id, packed=False)}


def plain_peft_logps(adapter_dir: Path, samples: list[list[int]]) -> torch.Tensor:
    """Log-probs of each next token, by plain peft's forward on each sample alone (no ftune code)."""
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in samples:
            ids = torch.tensor([ids])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -ids.shape[1]:]  # prompt tuning: past its virtual tokens
            out.append(torch.log_softmax(logits[:-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0])
    return torch.cat(out)


# --------------------------------------------------------------------------- train, save, reload


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_plain_peft_reloads_it_with_ftunes_log_probs(trained, tiny_model_dir, method):
    from transformers import AutoModelForCausalLM

    from ftune.modeling import adapters
    from ftune.train.training import TokenLogProbs

    run_dir = trained[method]
    evals = [r["eval_loss"] for r in metrics(run_dir) if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0], evals
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"lora_plus": "LORA", "vera": "VERA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING",
                                   "prefix_tuning": "PREFIX_TUNING"}[method]
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "completed" and meta["adapter"]["method"] == method

    samples, batches = sample_batches(tiny_model_dir)
    expected = plain_peft_logps(run_dir / "adapter", samples)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    scorer = TokenLogProbs(adapters.load(base, run_dir / "adapter")).eval()
    with torch.no_grad():
        for layout, batch in batches.items():
            torch.testing.assert_close(scorer(**batch), expected, atol=2e-5, rtol=1e-5, msg=lambda m: f"{layout}: {m}")
        untrained = TokenLogProbs(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))(**batches["padded"])
    assert (expected - untrained).abs().max() > 1e-2, "the adapter changes the model"


@pytest.mark.parametrize("method", VIRTUAL)
def test_generation_with_virtual_tokens_continues_as_the_forward_pass_predicts(trained, tiny_model_dir, method):
    """peft 0.21's generate misses transformers 5's cache (prompt tuning: garbage after one token; prefix
    tuning: the base model's answer); ftune's loaded adapters generate what the forward pass predicts."""
    from transformers import AutoModelForCausalLM

    from ftune.modeling import adapters

    model = adapters.load(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), trained[method] / "adapter").eval()
    ids = torch.tensor([[1, 520, 3012, 314, 253, 2214, 30, 198, 42, 1004]])
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        greedy = ids
        for _ in range(6):
            logits = model(input_ids=greedy, attention_mask=torch.ones_like(greedy)).logits
            greedy = torch.cat([greedy, logits[:, -1:].argmax(-1)], dim=1)
        with model.disable_adapter():
            base_answer = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert generated[0, -6:].tolist() == greedy[0, -6:].tolist()
    assert generated[0, -6:].tolist() != base_answer[0, -6:].tolist()


def test_the_resolved_recipe_keeps_only_the_methods_fields_and_validates_again(trained, monkeypatch, capsys):
    for method, run_dir in trained.items():
        resolved = (run_dir / "recipe.yaml").read_text()
        adapter_block = resolved.split("adapter:\n", 1)[1].split("\nquantization:", 1)[0]
        keys = {line.split(":")[0].strip() for line in adapter_block.splitlines()}
        assert ("num_virtual_tokens" in keys) == (method in VIRTUAL) and ("r" in keys) == (method in ("lora_plus", "vera"))
        code, output = invoke(["validate", str(run_dir / "recipe.yaml")], monkeypatch, capsys)
        assert code in (0, None), output
        card = (run_dir / "README.md").read_text()
        assert method in card and ("Not mergeable" in card) == (method in VIRTUAL)


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("method", METHODS)
def test_kill_9_then_resume_gives_the_same_adapter(tmp_path, trained, tiny_model_dir, method):
    recipe = write_recipe(tmp_path / method, tiny_model_dir, method)
    kill_at = random.Random(f"{method}-{os.getpid()}").randint(2, STEPS - 2)
    run_dir = recipe.parent / "run"
    kill_9_after_checkpoint("sft", recipe, kill_at)
    assert not (run_dir / "adapter").exists()

    resumed = start("sft", recipe)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming from step-" in " ".join(output.split()) and "Traceback" not in output
    expected, got = saved_adapter(trained[method]), saved_adapter(run_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == list(range(1, STEPS + 1))


# --------------------------------------------------------------------------- merge and export


@pytest.mark.parametrize("method", MERGEABLE)
def test_mergeable_methods_merge_with_a_passing_parity_report(tmp_path, trained, tiny_model_dir, method, monkeypatch, capsys):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code, output = invoke(["merge", str(trained[method]), "--out", str(out)], monkeypatch, capsys)
    assert code in (0, None), output
    assert "PASS" in output and "Traceback" not in output
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["precision"] == "float32" and report["top1_agreement"] == 1.0
    assert json.loads((out / "merge.json").read_text())["adapted_weights"] == {"lora_plus": 14, "vera": 14, "ia3": 14}[method]

    ids = torch.tensor([[1, 520, 3012, 314, 253, 2214, 30, 198, 42, 1004]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        adapter = AutoPeftModelForCausalLM.from_pretrained(trained[method] / "adapter", dtype=torch.float32).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
    assert (adapter - base).abs().max() > 0.05
    torch.testing.assert_close(merged, adapter, atol=1e-4, rtol=1e-4)


def ia3_and_vera_adapters(root: Path, base: Path) -> dict[str, Path]:
    """IA3 and VeRA adapters made with peft directly, their vectors far from their starting values,
    on a model with biases (IA3 scales those of the layers whose output it scales)."""
    from peft import IA3Config, VeraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    configs = {
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj", "up_proj"], feedforward_modules=["down_proj"],
                         task_type="CAUSAL_LM"),
        "vera": VeraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"], save_projection=True, task_type="CAUSAL_LM"),
    }
    made = {}
    for name, config in configs.items():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
        generator = torch.Generator().manual_seed(1)
        for key, param in model.named_parameters():
            if param.requires_grad:
                param.data = param.data + 0.5 * torch.randn(param.shape, generator=generator)
        model.save_pretrained(root / name)
        made[name] = root / name
    return made


def test_ia3_and_vera_merge_arithmetic_equals_peft_merge_and_unload(tmp_path, demo_model_dir):
    """Per weight, against peft's own merge, on a Qwen2 model (biases on q, k and v)."""
    from conftest import build_tiny_model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftune.merge.plan import plan_merge
    from ftune.merge.source import read_source
    from ftune.merge.writer import merged_tensor

    base = build_tiny_model(tmp_path / "qwen2", demo_model_dir, arch="qwen2")
    for name, adapter_dir in ia3_and_vera_adapters(tmp_path, base).items():
        plan = plan_merge(read_source(adapter_dir, None), rounded_base=False)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter_dir)
        reference = model.merge_and_unload().state_dict()
        changed = 0
        for out_key, base_key in plan.outputs:
            got = merged_tensor(plan, out_key, base_key).float()
            torch.testing.assert_close(got, reference[out_key], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name} {out_key}: {m}")
            changed += out_key.endswith(".bias") and name == "ia3" and "k_proj" in out_key
        assert len(plan.ia3 if name == "ia3" else plan.lora) == 2 * (4 if name == "ia3" else 3)
        if name == "ia3":
            assert changed == 2 and not any(w.feedforward for k, w in plan.ia3.items() if "up_proj" in k)


@pytest.mark.parametrize("method", VIRTUAL)
def test_merge_and_export_refuse_virtual_tokens_and_write_nothing(tmp_path, trained, method, monkeypatch, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained[method], run_dir)
    before = snapshot(tmp_path)
    commands = {
        "merge": ["merge", str(run_dir), "--out", str(tmp_path / "merged")],
        "merge-adapter": ["merge", str(run_dir / "adapter"), "--out", str(tmp_path / "merged")],
        "export-gguf": ["export-gguf", str(run_dir), "--out", str(tmp_path / "new" / "model.gguf"), "--type", "q8_0"],
    }
    for name, argv in commands.items():
        code, output = invoke(argv, monkeypatch, capsys)
        assert code not in (0, None), f"{name}: {output}"
        text = " ".join(output.split())
        for needle in ("adapter_config.json", "cannot be merged", "virtual tokens", "not a change to any weight",
                       "serve it with peft", "adapter.method: lora"):
            assert needle in text, f"{name}: {needle!r} not in {output}"
        assert f"ftune {argv[0]}" in text and "Traceback" not in output
        assert snapshot(tmp_path) == before, f"{name} changed the disk"


# --------------------------------------------------------------------------- inspect, LoRA+


@pytest.mark.parametrize("method", METHODS)
def test_inspect_counts_the_trainable_parameters_peft_counts(tmp_path, tiny_model_dir, method, monkeypatch, capsys):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ftune.modeling.adapters import peft_config
    from ftune.recipe import load_recipe

    recipe = write_recipe(tmp_path, tiny_model_dir, method)
    code, output = invoke(["inspect", str(recipe), "--json"], monkeypatch, capsys)
    assert code in (0, None), output
    numbers = json.loads(output[output.index("{"):])
    adapter = load_recipe(recipe).adapter
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft_config(adapter, str(tiny_model_dir)))
    trainable, _ = model.get_nb_trainable_parameters()
    assert numbers["trainable_parameters"] == trainable > 0
    memory = numbers["memory_gib"]
    assert memory["adapter"] * 2**30 == pytest.approx(trainable * 4)
    assert memory["optimizer"] * 2**30 == pytest.approx(trainable * 2 * 4)

    code, output = invoke(["inspect", str(recipe), "--samples", "0"], monkeypatch, capsys)
    assert code in (0, None) and "trainable parameters" in output and f"{trainable:,}" in output, output


ESTIMATED_METHODS = {
    "ia3": "adapter: {method: ia3}\n",
    "vera": "adapter: {method: vera, r: 32}\n",
    "vera-dropout": "adapter: {method: vera, r: 32, dropout: 0.1}\n",
    "prompt_tuning": "adapter: {method: prompt_tuning, num_virtual_tokens: 8}\n",
    "prefix_tuning": "adapter: {method: prefix_tuning, num_virtual_tokens: 8}\n",
}


@pytest.mark.parametrize("name", ESTIMATED_METHODS)
def test_activation_estimate_matches_what_autograd_keeps(tiny_model_dir, name):
    """The activations line against the tensors autograd saves in one forward of ftune's scorer
    (saved-tensor hooks), less the loss's log-softmax, which the loss line counts. Virtual-token
    methods train on padded rows, so the second row is padded (attention then runs with a mask)."""
    from transformers import AutoModelForCausalLM

    from ftune.modeling import adapters, memory
    from ftune.modeling.models import model_config
    from ftune.recipe import parse_recipe
    from ftune.train.training import TokenLogProbs

    recipe = parse_recipe(f"stage: sft\nbase_model: {{name: {tiny_model_dir}}}\ndata:\n  train: [{{path: d.jsonl}}]\n  max_length: 64\n"
                          f"  packing: false\noutput: {{dir: run}}\n{ESTIMATED_METHODS[name]}", "recipe.yaml")
    rows, length = 2, 64
    ids = torch.randint(0, 49000, (rows, length), generator=torch.Generator().manual_seed(0))
    targets, mask = ids.clone(), torch.ones_like(ids)
    targets[:, : length - 10] = -100
    if recipe.adapter.method in VIRTUAL:
        mask[1, -5:], targets[1, -5:] = 0, -100
    labelled = int((targets != -100).sum())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    scorer = TokenLogProbs(adapters.attach(model, recipe.adapter, str(tiny_model_dir))).train()
    weights = {t.untyped_storage().data_ptr() for t in [*scorer.parameters(), *scorer.buffers()]}
    kept: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        scorer(input_ids=ids, position_ids=torch.arange(length).expand(rows, -1), targets=targets, attention_mask=mask)
    measured = sum(kept.values()) - labelled * model.config.vocab_size * 4  # the log-softmax: the loss line's
    count = memory.count_model(model_config(str(tiny_model_dir)), recipe.adapter)
    estimate = memory.estimate(recipe, count, tokens=rows * length, labelled=labelled, device="cpu")
    activations = next(line for line in estimate.lines if line.what == "activations")
    # With dropout the estimate counts a mask in every layer; layer 0's q, k and v read the frozen
    # embeddings, which need no gradient, so autograd keeps none there: 3 of 14 masks on 2 layers.
    assert activations.bytes == pytest.approx(measured, rel=0.07 if "dropout" in name else 0.03), activations.formula
    if recipe.adapter.method in VIRTUAL:
        assert "8 virtual tokens per row" in activations.formula


def test_lora_plus_learning_rates_are_peft_create_loraplus_optimizers(tiny_model_dir):
    """Every parameter's learning rate as peft's create_loraplus_optimizer sets it, with a LoRA on the
    embedding, DoRA magnitudes (one-dimensional) and a trained copy of the norm; the ratio holds under the schedule."""
    from peft import get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from transformers import AutoModelForCausalLM

    from ftune.modeling.adapters import lora_config
    from ftune.recipe import AdapterSection, TrainingSection
    from ftune.train.training import make_optimizer, make_scheduler

    adapter = AdapterSection(method="lora_plus", r=4, alpha=8, lora_plus_ratio=4.0,
                             target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["norm"])
    dora = adapter.model_copy(update={"method": "dora"})
    training = TrainingSection(learning_rate=1e-3, weight_decay=0.01, warmup_ratio=0.0)
    for config in (adapter, dora):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config(config))
        theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4.0)
        their_lr = {id(p): g["lr"] for g in theirs.param_groups for p in g["params"]}
        ours = make_optimizer(training, model, config.model_copy(update={"method": "lora_plus"}))
        our_lr = {id(p): g["lr"] for g in ours.param_groups for p in g["params"]}
        assert our_lr == their_lr
        assert {g["lr"] for g in ours.param_groups} == {1e-3, 4e-3, 1e-6}
        assert all(g["weight_decay"] == (0.01 if g["params"][0].ndim >= 2 else 0.0) for g in ours.param_groups)
    scheduler = make_scheduler(training, ours, total_steps=10)
    for _ in range(5):
        ours.step()
        scheduler.step()
    rates = sorted({g["lr"] for g in ours.param_groups})
    assert rates[2] / rates[1] == pytest.approx(4.0) and rates[1] < 1e-3


# --------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning"])
def test_dpo_reference_is_the_starting_model(tmp_path, tiny_model_dir, method):
    """Policy and reference agree before the first update, so the first step's DPO loss is log 2:
    IA3 through its switched-off adapter, prompt tuning through its starting virtual tokens (the base
    without them is a different model)."""
    from ftune.stages import dpo

    pairs = [{"prompt": f"Reply to message {i}.", "chosen": f"Thank you for message {i}!", "rejected": f"Go away, {i}."} for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "recipe.yaml").write_text(
        f"stage: dpo\nbase_model: {{name: {tiny_model_dir}}}\ndata:\n  train: [{{path: pairs.jsonl}}]\n  eval_fraction: 0.25\n"
        f"  max_length: 64\npreference: {{method: dpo, beta: 0.5}}\n{METHODS[method]}"
        "training: {learning_rate: 2.0e-2, batch_size: 2, max_steps: 2, warmup_ratio: 0}\noutput: {dir: run}\n")
    run_dir = dpo.run(tmp_path / "recipe.yaml")
    first = next(r for r in metrics(run_dir) if "loss" in r)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)


# --------------------------------------------------------------------------- recipe strictness


BAD_ADAPTERS = {
    "typo-method": ("adapter: {method: prompt_tunning}\n", ["line 7", "adapter.method", "did you mean 'prompt_tuning'"]),
    "tokens-on-lora": ("adapter:\n  method: lora\n  num_virtual_tokens: 8\n",
                       ["line 9", "adapter.num_virtual_tokens", "does not apply to method lora", "prompt_tuning, prefix_tuning"]),
    "rank-on-ia3": ("adapter: {method: ia3, r: 8}\n", ["line 7", "adapter.r: does not apply to method ia3"]),
    "alpha-on-vera": ("adapter: {method: vera, alpha: 8}\n", ["adapter.alpha: does not apply to method vera"]),
    "ratio-on-lora": ("adapter: {method: lora, lora_plus_ratio: 4}\n", ["adapter.lora_plus_ratio", "is for lora_plus"]),
    "text-on-prefix": ("adapter: {method: prefix_tuning, init_text: hello}\n", ["adapter.init_text", "is for prompt_tuning"]),
    "rank-without-adapter": ("adapter: {method: none, r: 4}\n", ["adapter.r", "full fine-tuning has no adapter"]),
    "feedforward-not-targeted": ("adapter: {method: ia3, target_modules: [k_proj, v_proj], feedforward_modules: [down_proj]}\n",
                                 ["adapter.feedforward_modules", "down_proj is not in target_modules"]),
    "zero-tokens": ("adapter: {method: prompt_tuning, num_virtual_tokens: 0}\n", ["adapter.num_virtual_tokens", "greater than or equal to 1"]),
    "blank-init-text": ("adapter: {method: prompt_tuning, init_text: '  '}\n", ["adapter.init_text", "blank"]),
    "negative-ratio": ("adapter: {method: lora_plus, lora_plus_ratio: -2}\n", ["adapter.lora_plus_ratio", "greater than 0"]),
    "infinite-ratio": ("adapter: {method: lora_plus, lora_plus_ratio: .inf}\n", ["adapter.lora_plus_ratio"]),
}


@pytest.mark.parametrize("name", BAD_ADAPTERS, ids=list(BAD_ADAPTERS))
def test_bad_adapter_sections_are_named_with_their_line(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    block, needles = BAD_ADAPTERS[name]
    (tmp_path / "recipe.yaml").write_text(
        f"stage: sft\nbase_model: {{name: {tiny_model_dir}}}\ndata:\n  train: [{{path: data.jsonl}}]\n  packing: false\n"
        f"output: {{dir: run}}\n{block}")
    before = snapshot(tmp_path)
    for command in ("validate", "sft"):
        code, output = invoke([command, str(tmp_path / "recipe.yaml")], monkeypatch, capsys)
        assert code == 2, output
        for needle in needles:
            assert needle in output, f"{command}: {needle!r} not in:\n{output}"
        assert "Traceback" not in output
    assert snapshot(tmp_path) == before


CROSS_SECTION = {
    "prompt-tuning-packed": ("adapter: {method: prompt_tuning}\n", [], ["line 3", "data.packing", "set data.packing: false"]),
    "prefix-tuning-checkpointing": ("adapter: {method: prefix_tuning}\ntraining: {gradient_checkpointing: true}\n", ["  packing: false\n"],
                                    ["training.gradient_checkpointing", "prefix_tuning does not work with gradient checkpointing"]),
    "set-method-keeps-rank": ("adapter: {r: 8}\n", ["  packing: false\n"], ["line 7", "adapter.r: does not apply to method ia3"]),
}


@pytest.mark.parametrize("name", CROSS_SECTION, ids=list(CROSS_SECTION))
def test_methods_refuse_what_they_cannot_do_before_anything_loads(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    block, data_lines, needles = CROSS_SECTION[name]
    (tmp_path / "recipe.yaml").write_text(
        f"stage: sft\nbase_model: {{name: {tiny_model_dir}}}\ndata:\n  train: [{{path: data.jsonl}}]\n{''.join(data_lines)}"
        f"output: {{dir: run}}\n{block}")
    extra = ["--set", "adapter.method=ia3"] if name == "set-method-keeps-rank" else []
    code, output = invoke(["validate", str(tmp_path / "recipe.yaml"), *extra], monkeypatch, capsys)
    assert code == 2, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
