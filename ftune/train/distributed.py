"""Runs on several devices or machines, through Hugging Face accelerate.

`ftune sft RECIPE` with `distributed.num_processes > 1` writes an accelerate config
(DDP, FSDP or DeepSpeed ZeRO, generated from the recipe) into the run directory and
re-launches itself under `accelerate launch`. Each launched process runs the same stage
code; the stage asks `Accelerator` for its rank, shards the batches, and only the main
process logs and writes.

On a machine without GPUs, DDP runs over gloo, one CPU process per rank: what the tests
use. FSDP and DeepSpeed need GPUs; their configs are generated and checked all the same.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from ftune.errors import FtuneError
from ftune.recipe import DistributedSection, Recipe
# The mark of a launched process lives with the run lock, which reads it too; the loop asks here.
from ftune.artifacts.lock import LAUNCHED_ENV
from ftune.artifacts.ownership import atomic_file
from ftune.train.progress import console

CONFIG_FILE = "accelerate_config.yaml"
# `accelerate launch`, without the log lines and the traceback torch's launcher adds when a
# process exits non-zero or a signal is passed on: every process has said what went wrong
# (rank 0 for all), and ftune's own message follows.
LAUNCHER = """import logging, sys
from accelerate.commands.launch import main
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
try:
    main()
except ChildFailedError as failed:
    sys.exit(max((f.exitcode for f in failed.failures.values() if f.exitcode > 0), default=1))
"""


def accelerate_config(dist: DistributedSection, *, cuda: bool, gradient_accumulation_steps: int, layer_class: str | None = None) -> dict:
    """The accelerate config file contents for a recipe's distributed section."""
    config: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "mixed_precision": "no",  # ftune loads weights in the recipe's dtype itself
        "num_processes": dist.num_processes,
        "num_machines": dist.num_machines,
        "machine_rank": dist.machine_rank,
        "main_process_port": dist.main_process_port,
        "rdzv_backend": "static",
        "same_network": True,
        # accelerate's launcher starts one process per rank only for MULTI_GPU; the stage then
        # asks for gloo over CPU itself when there is no GPU (Accelerator(cpu=True)).
        "use_cpu": False,
        "downcast_bf16": "no",
    }
    if dist.main_process_ip:
        config["main_process_ip"] = dist.main_process_ip
    if dist.backend == "ddp":
        config["distributed_type"] = "MULTI_GPU"
    elif dist.backend == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 1,
            "fsdp_sharding_strategy": dist.fsdp_sharding.upper(),
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            # e.g. LlamaDecoderLayer: each decoder layer is one FSDP unit.
            "fsdp_transformer_layer_cls_to_wrap": layer_class or "",
            "fsdp_offload_params": dist.fsdp_cpu_offload,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": False,
            # LoRA freezes most parameters: FSDP must keep the original ones to mix frozen and trainable.
            "fsdp_use_orig_params": True,
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_sync_module_states": True,
            "fsdp_activation_checkpointing": False,
        }
    else:
        config["distributed_type"] = "DEEPSPEED"
        offload = "cpu" if dist.zero_offload else "none"
        config["deepspeed_config"] = {
            "zero_stage": dist.zero_stage,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "gradient_clipping": 1.0,
            "offload_optimizer_device": offload,
            "offload_param_device": offload if dist.zero_stage == 3 else "none",
            "zero3_init_flag": dist.zero_stage == 3,
            "zero3_save_16bit_model": dist.zero_stage == 3,
        }
    return config


def decoder_layer_class(model_path: str, trust_remote_code: bool) -> str | None:
    """Name of the model's decoder-layer class (what FSDP wraps), read from its config only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
        return getattr(model_class, "_no_split_modules", None)[0]
    except Exception:  # an unusual architecture: accelerate's own default then applies
        return None


class LaunchFailed(FtuneError):
    def __init__(self, stage: str, code: int):
        if code == 130:
            super().__init__(f"the distributed {stage} run was interrupted; the processes' messages above say how to resume it, if it began")
        else:
            super().__init__(f"the distributed {stage} run failed (exit code {code}); see the processes' messages above")
        self.exit_code = code


def launch_distributed(stage: str, recipe: Recipe, recipe_path: Path, overrides, run_dir: Path, base_dir: Path, *,
                       smoke: bool, resume: bool, overwrite: bool) -> Path:
    """Decide fresh run or resume once, then run the stage in `num_processes` processes.

    The main machine's launcher plans the run directory and holds its lock for its processes;
    another machine's launcher only starts processes that compute (rank 0 writes).
    """
    from ftune.artifacts import runs

    with contextlib.ExitStack() as held:
        if not run_dir.exists():
            held.callback(_remove_unused, run_dir)
        if recipe.distributed.machine_rank == 0:
            # --smoke replaces its own previous smoke run (ftune's, the ownership rule still applies)
            plan = runs.plan_run_dir(run_dir, recipe, recipe_path, resume=resume, overwrite=overwrite or smoke, say=_say)
            held.enter_context(runs.start_run_dir(run_dir, plan, _say))
        code = _launch(stage, recipe, recipe_path, overrides, run_dir, base_dir, smoke=smoke)
        if code != 0:
            # torch's launcher may exit 1 from its own signal handler after the processes
            # checkpointed and stopped cleanly: the run says what happened.
            try:
                if runs.read_run(run_dir).status == "interrupted":
                    code = 130
            except FtuneError:  # no readable run.json: the processes never got that far
                pass
            raise LaunchFailed(stage, code)
    return run_dir


def _say(text: str) -> None:
    console.print(text, highlight=False)


def _remove_unused(run_dir: Path) -> None:
    """A launch whose processes stopped before writing a run leaves no directory behind."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {CONFIG_FILE}:
        (run_dir / CONFIG_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir.rmdir()


def _launch(stage: str, recipe: Recipe, recipe_path: Path, overrides, run_dir: Path, base_dir: Path, *, smoke: bool) -> int:
    import torch

    from ftune.modeling import models

    dist = recipe.distributed
    layer_class = None
    if dist.backend == "fsdp":
        model_path = models.resolve_model_path(recipe.base_model.name, revision=recipe.base_model.revision, base_dir=base_dir)
        layer_class = decoder_layer_class(model_path, recipe.base_model.trust_remote_code)
    config = accelerate_config(dist, cuda=torch.cuda.is_available(), layer_class=layer_class,
                               gradient_accumulation_steps=recipe.training.gradient_accumulation_steps)
    argv = [item for o in overrides for item in ("--set", o)] + (["--smoke"] if smoke else [])
    console.print(f"launching {dist.num_processes} processes ({dist.backend}) with accelerate; config: {run_dir / CONFIG_FILE}")
    return launch(stage, recipe_path, argv, run_dir, config)


def launch(stage: str, recipe_path: Path, argv: list[str], run_dir: Path, config: dict) -> int:
    """Write the accelerate config into the run directory and run the stage under `accelerate launch`.

    The launcher runs in a session of its own, so a terminal's Ctrl-C reaches this process
    only, which passes each SIGINT/SIGTERM on once: torch's launcher hands it to every
    process of the run, and each of them sees one signal (a second would mean "stop at once").
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CONFIG_FILE
    with atomic_file(config_path) as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    command = [sys.executable, "-c", LAUNCHER, "--config_file", str(config_path), "-m", "ftune", stage, str(recipe_path), *argv]
    env = {**os.environ, LAUNCHED_ENV: "1"}
    try:
        child = subprocess.Popen(command, env=env, start_new_session=True)
    except OSError as exc:
        raise FtuneError(f"cannot start accelerate: {exc}") from None

    stopped = []

    def forward(signum, frame) -> None:
        stopped.append(signum)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
        return 130 if code != 0 and stopped else code  # torch's launcher reports a stopped run as failed
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Context:
    """This process's place in the run: rank, world size, and the accelerate objects."""

    def __init__(self) -> None:
        import torch
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        if self.world > 1 and not torch.cuda.is_available():
            # CPU processes on one machine share its cores: each takes its share of threads,
            # or their thread pools spin against each other (several times slower).
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device

    def accumulating(self, model, last: bool):
        """Context for one backward pass of an optimizer step: DDP skips its gradient all-reduce
        on every pass but the step's last (the gradients add up locally either way)."""
        import contextlib

        from accelerate.utils import DistributedType

        if last or self.accelerator.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def loss_scale(self, accumulation_steps: int) -> float:
        """Factor on a loss already divided by the step's total tokens (or pairs).

        DDP and FSDP average gradients over processes, so the factor is the world size;
        DeepSpeed also divides every micro-batch loss by its accumulation steps itself.
        """
        from accelerate.utils import DistributedType

        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        return self.world * (accumulation_steps if deepspeed else 1)

    def sum(self, value: float):
        """Sum a number over all processes (a no-op alone)."""
        import torch

        if self.world == 1:
            return value
        return float(self.accelerator.reduce(torch.tensor([float(value)], device=self.device), "sum")[0])

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()
