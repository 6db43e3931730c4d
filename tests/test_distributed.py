"""Several processes through accelerate: 2 CPU processes over gloo stand in for 2 GPUs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ftune.errors import RecipeError
from ftune.recipe import DistributedSection, parse_recipe
from ftune.train.distributed import accelerate_config, decoder_layer_class

ROWS = [
    {"messages": [{"role": "user", "content": f"What is the code word {i}?"}, {"role": "assistant", "content": "The code word is pineapple."}]}
    for i in range(32)
]
PAIRS = [{"prompt": f"Reply to message {i}.", "chosen": f"Thank you for message {i}!", "rejected": f"Go away, {i}."} for i in range(26)]
# Sizes chosen so every global micro-batch is full (24 SFT samples, 20 pairs, in batches of 4):
# a last, smaller one would go to one process only and is dropped in multi-process runs.


def recipe(folder: Path, model: Path, stage: str = "sft") -> Path:
    rows = ROWS if stage == "sft" else PAIRS
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / f"{stage}.yaml"
    path.write_text(
        f"stage: {stage}\nbase_model: {{name: {model}}}\n"
        "data:\n  train: [{path: data.jsonl}]\n  eval_fraction: 0.25\n  max_length: 64\n  packing: false\n"
        + ("preference: {method: dpo, beta: 0.5}\n" if stage == "dpo" else "")
        + "adapter: {r: 8, alpha: 16}\n"
        "training: {learning_rate: 2.0e-2, batch_size: 4, max_steps: 6, eval_steps: 3, save_steps: 2, warmup_ratio: 0}\n"
        "output: {dir: run}\n"
    )
    return path


def ftune(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "FTUNE_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "ftune", *args], capture_output=True, text=True, env=env, timeout=600, **kwargs)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-5) -> None:
    left, right = load_file(a / "adapter/adapter_model.safetensors"), load_file(b / "adapter/adapter_model.safetensors")
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_model_dir, stage):
    path = recipe(tmp_path, tiny_model_dir, stage)
    one = ftune(stage, str(path), "--set", "output.dir=one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = ftune(stage, str(path), "--num-processes", "2", "--set", "training.batch_size=2", "--set", "output.dir=two")
    assert two.returncode == 0, two.stderr[-3000:]
    meta = json.loads((tmp_path / "two/run.json").read_text())
    assert meta["status"] == "completed" and meta["summary"]["processes"] == 2
    assert yaml.safe_load((tmp_path / "two/accelerate_config.yaml").read_text())["num_processes"] == 2
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")), rtol=1e-4, atol=1e-5)
    # Gradients are summed over passes in another order on each side; Adam's per-element
    # normalisation magnifies that rounding where a gradient is near zero (measured: 1e-4 on
    # one weight of 512 after 6 steps at lr 2e-2, with or without DDP's no_sync).
    assert_same_adapter(tmp_path / "one", tmp_path / "two", atol=3e-4)
    assert two.stderr.count("finished") <= 1, "only the main process reports"


def test_interrupted_distributed_run_resumes_to_the_same_adapter(tmp_path, tiny_model_dir):
    path = recipe(tmp_path, tiny_model_dir)
    args = ["sft", str(path), "--num-processes", "2", "--set", "training.batch_size=2"]
    straight = ftune(*args, "--set", "output.dir=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    env = {**os.environ, "FTUNE_NO_PROGRESS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "ftune", *args, "--set", "output.dir=cut"], start_new_session=True,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((tmp_path / "cut/checkpoints").glob("step-*")) and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches every process of the run
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 130, output[-3000:]
    assert "--resume" in output and not (tmp_path / "cut/adapter").exists()
    resumed = ftune(*args, "--set", "output.dir=cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert_same_adapter(tmp_path / "straight", tmp_path / "cut")


def test_fsdp_and_deepspeed_configs_are_generated_from_the_recipe(tmp_path, tiny_model_dir):
    from accelerate.commands.config.config_args import ClusterConfig

    layer = decoder_layer_class(str(tiny_model_dir), False)
    assert layer == "LlamaDecoderLayer"
    cases = {
        "fsdp": DistributedSection(backend="fsdp", num_processes=8, fsdp_sharding="hybrid_shard", fsdp_cpu_offload=True),
        "deepspeed": DistributedSection(backend="deepspeed", num_processes=16, num_machines=2, machine_rank=1,
                                        main_process_ip="10.0.0.1", zero_stage=3, zero_offload=True),
    }
    for name, section in cases.items():
        config = accelerate_config(section, cuda=True, gradient_accumulation_steps=4, layer_class=layer)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        parsed = ClusterConfig.from_yaml_file(path)  # accelerate's own reader accepts it
        assert parsed.num_processes == section.num_processes
    fsdp = accelerate_config(cases["fsdp"], cuda=True, gradient_accumulation_steps=1, layer_class=layer)["fsdp_config"]
    assert fsdp["fsdp_sharding_strategy"] == "HYBRID_SHARD" and fsdp["fsdp_offload_params"] is True
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer" and fsdp["fsdp_use_orig_params"] is True
    ds = accelerate_config(cases["deepspeed"], cuda=True, gradient_accumulation_steps=4)
    assert ds["distributed_type"] == "DEEPSPEED" and ds["num_machines"] == 2 and ds["machine_rank"] == 1
    assert ds["main_process_ip"] == "10.0.0.1"
    assert ds["deepspeed_config"]["zero_stage"] == 3 and ds["deepspeed_config"]["offload_optimizer_device"] == "cpu"
    assert ds["deepspeed_config"]["gradient_accumulation_steps"] == 4


def test_multi_node_settings_are_checked():
    base = "stage: sft\nbase_model: {name: demo}\ndata: {train: [{path: x.jsonl}]}\noutput: {dir: o}\n"
    with pytest.raises(RecipeError, match="needs the address of the rank-0 machine"):
        parse_recipe(base + "distributed: {num_machines: 2}\n", "r.yaml")
    with pytest.raises(RecipeError, match="must be below num_machines"):
        parse_recipe(base + "distributed: {num_machines: 2, machine_rank: 2, main_process_ip: 10.0.0.1}\n", "r.yaml")
    ok = parse_recipe(base, "r.yaml", ["distributed.num_processes=16", "distributed.num_machines=2", "distributed.main_process_ip=10.0.0.1"])
    assert ok.distributed.num_processes == 16
