"""`ftune chat MODEL`: talk to a model in the terminal, or answer prompts for a script.

MODEL is anything ftune starts from or produces: a base model ('demo', a hub id, a local
directory), a run directory, a PEFT adapter directory, a merged model directory, or a GGUF
file. `resolve` finds what to load without loading it (so `ftune eval` can check many models
first); `load` loads it. Transformers models answer through their chat template, the one the
run trained with, and stop at its end-of-turn token; GGUF files answer through llama.cpp
with the template stored in the file. Both stream: transformers through a
TextIteratorStreamer fed by `generate` in a thread, llama.cpp through its own stream.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ftune.artifacts import run_checks
from ftune.artifacts.ownership import RUN_FILE
from ftune.artifacts.runs import read_run
from ftune.errors import FtuneError
from ftune.guards import bounds, signals, textio
from ftune.modeling import models
from ftune.recipe import CHAT_TEMPLATE_NAMES

COMMANDS = "/system TEXT sets the system prompt, /reset starts over, /quit (or Ctrl-D) leaves"


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.9
    seed: int | None = None


@dataclass(frozen=True)
class Target:
    """What MODEL names, resolved to files but not loaded."""

    spec: str
    kind: str  # gguf, run, adapter, merged (written by `ftune merge`), model
    path: Path  # the GGUF file, or the model directory to load weights from
    adapter: Path | None = None
    tokenizer: Path | None = None  # directory holding the tokenizer (GGUF: none)
    chat_template: str = "auto"  # a run's data.chat_template
    system_prompt: str | None = None  # a run's data.system_prompt
    quantization: dict | None = None  # a QLoRA run's 4-bit settings: the adapter is used as it was trained
    trust_remote_code: bool = False  # the user's choice (command line or own recipe), never a file's


def resolve(spec: str, *, base_dir: Path | None = None, trust_remote_code: bool = False) -> Target:
    """What `spec` names. Whether Python shipped with the model may run is `trust_remote_code`
    alone: a run or adapter directory may come from anyone, so nothing in it turns it on."""
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FtuneError(f"GGUF file {path} does not exist")
        return Target(spec, "gguf", path)
    if path.is_dir() and (path / RUN_FILE).is_file():
        return _resolve_run(spec, path, trust_remote_code)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        run_checks.check_adapter(path)  # its config an object, its weights safetensors
        config = textio.load_file(path / "adapter_config.json", "adapter config")
        if isinstance(config, dict) and config.get("task_type") == "SEQ_CLS":
            raise FtuneError(f"{path} is a reward-model adapter (peft task SEQ_CLS); this command needs a model that "
                             "writes answers", hint=run_checks.USES["generate"].hint)
        name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        if not name:
            raise FtuneError("adapter_config.json does not name its base model (base_model_name_or_path)", place=str(path))
        base = Path(models.resolve_model_path(name, revision=config.get("revision")))
        return Target(spec, "adapter", base, adapter=path, tokenizer=_tokenizer_dir(path, base), trust_remote_code=trust_remote_code)
    base = Path(models.resolve_model_path(spec, base_dir=base_dir))
    return Target(spec, "merged" if (base / "merge.json").is_file() else "model", base, tokenizer=base,
                  trust_remote_code=trust_remote_code)


def _resolve_run(spec: str, run_dir: Path, trust_remote_code: bool) -> Target:
    run = read_run(run_dir, expect="generate")
    recipe = run.recipe()  # the chat format it trained with (its trust_remote_code is not read)
    chat_template = recipe.data.chat_template if recipe else "auto"
    if chat_template not in CHAT_TEMPLATE_NAMES:
        chat_template = "auto"  # a template file or inline text: the run saved it as its tokenizer's chat_template
    system_prompt = recipe.data.system_prompt if recipe else None
    if (run.model_dir / "config.json").is_file():  # full fine-tuning: a whole model
        return Target(spec, "run", run.model_dir, tokenizer=run.model_dir, chat_template=chat_template,
                      system_prompt=system_prompt, trust_remote_code=trust_remote_code)
    adapter = run.adapter_dir
    if not (adapter / "adapter_config.json").is_file():
        raise FtuneError(f"{run_dir} holds no trained adapter or model yet (status: {run.status})", hint="chat with a finished run")
    base_path = Path(models.run_base_path(run))
    return Target(spec, "run", base_path, adapter=adapter, tokenizer=_tokenizer_dir(adapter, base_path), chat_template=chat_template,
                  system_prompt=system_prompt, quantization=run.quantization, trust_remote_code=trust_remote_code)


def _tokenizer_dir(adapter: Path, base: Path) -> Path:
    """ftune saves the tokenizer beside the adapter; a bare adapter may rely on its base's."""
    return adapter if any((adapter / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")) else base


# --------------------------------------------------------------------------- loaded models


@dataclass
class HFModel:
    """A transformers model, with its adapter, and the chat formatting it was trained with."""

    target: Target
    model: object
    tokenizer: object
    formatter: object
    generation: object  # GenerationConfig that stops at the end-of-turn token
    device: object

    def stream(self, messages: list[dict], sampling: Sampling) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        text = self.formatter.render(self.formatter.with_system(tuple(messages)), add_generation_prompt=True)
        inputs = self.tokenizer(text, add_special_tokens=self.formatter.prepend_bos, return_tensors="pt").to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        halt = threading.Event()

        class Halt(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), halt.is_set(), dtype=torch.bool, device=input_ids.device)

        config = self.generation_config(sampling)
        config.max_new_tokens = bounds.new_tokens(self.model, config.max_new_tokens, inputs["input_ids"].shape[1])
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                with torch.no_grad():
                    self.model.generate(**inputs, generation_config=config, streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([Halt()]))
            except BaseException as exc:  # shown in the caller's thread, after the stream ends
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            halt.set()  # the caller stopped reading (Ctrl-C): generation ends at the next token
            worker.join()
        if failure:
            raise failure[0]

    def generation_config(self, sampling: Sampling):
        import copy

        config = copy.deepcopy(self.generation)
        config.max_new_tokens = sampling.max_new_tokens
        if sampling.temperature > 0:
            config.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            config.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)  # defaults: nothing to warn about
        return config

    def close(self) -> None:
        self.model = None


@dataclass
class GGUFModel:
    """A GGUF file in llama.cpp; `logits` keeps every position's logits, for `ftune eval`'s loss."""

    target: Target
    llm: object
    context: int
    logits: bool = False
    notes: list[str] = field(default_factory=list)

    def stream(self, messages: list[dict], sampling: Sampling) -> Iterator[str]:
        chunks = self.llm.create_chat_completion(
            messages=list(messages), max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=50, min_p=0.0, seed=sampling.seed, stream=True,  # transformers' sampling defaults
        )
        for chunk in chunks:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece

    def close(self) -> None:
        self.llm.close()
        self.llm = None


def load(target: Target, *, logits: bool = False, context: int = 4096) -> HFModel | GGUFModel:
    models.quiet_libraries()
    if target.kind == "gguf":
        return _load_gguf(target, logits=logits, context=context)
    from ftune.modeling.reward_model import reward_model_kind

    what = reward_model_kind(Path(target.spec))
    if what:  # it scores answers; it has no language-model head to write one
        raise FtuneError(f"{target.spec} is {what}: it scores answers and writes none",
                         hint=f"score answers with `ftune score {target.spec} --data FILE`; chat with the model they came from")
    import torch

    from ftune.data.rendering import make_formatter
    from ftune.recipe import QuantizationSection
    from ftune.train.outputs import generation_config

    quantization = QuantizationSection.model_validate(target.quantization) if target.quantization else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = models.load_model(str(target.path), dtype=models.pick_dtype("auto"), quantization=quantization,
                              trust_remote_code=target.trust_remote_code)
    if target.adapter is not None:
        from ftune.modeling.adapters import load as load_adapter

        model = load_adapter(model, target.adapter)
    if quantization is None:
        model.to(device)
    model.eval()
    tokenizer = models.load_tokenizer(str(target.tokenizer), trust_remote_code=target.trust_remote_code)
    formatter = make_formatter(tokenizer, chat_template=target.chat_template, system_prompt=target.system_prompt)
    return HFModel(target, model, tokenizer, formatter, generation_config(model, tokenizer, formatter), device)


def _load_gguf(target: Target, *, logits: bool, context: int) -> GGUFModel:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise FtuneError("GGUF files run through llama.cpp, which is not installed",
                         hint="pip install llama-cpp-python (or `make install`)") from None
    try:
        llm = Llama(model_path=str(target.path), n_ctx=context, logits_all=logits, verbose=False)
    except ValueError as exc:
        raise FtuneError(f"llama.cpp cannot load {target.path}: {exc}") from None
    return GGUFModel(target, llm, context, logits)


# --------------------------------------------------------------------------- talking


def answer(model: HFModel | GGUFModel, messages: list[dict], sampling: Sampling) -> str:
    return "".join(model.stream(messages, sampling)).strip()


def sample_answers(model: HFModel | GGUFModel, messages: list[dict], sampling: Sampling, n: int) -> list[str]:
    """n answers to one conversation; the same seed gives the same n answers.

    Transformers samples the n together (one `generate`, num_return_sequences); llama.cpp
    answers n times with seeds seed, seed+1, ...
    """
    if n == 1 or sampling.temperature <= 0:  # greedy: one answer is every answer
        return [answer(model, messages, sampling)] * n
    if isinstance(model, GGUFModel):
        seeds = [None if sampling.seed is None else sampling.seed + k for k in range(n)]
        return [answer(model, messages, Sampling(sampling.max_new_tokens, sampling.temperature, sampling.top_p, s)) for s in seeds]
    import torch

    text = model.formatter.render(model.formatter.with_system(tuple(messages)), add_generation_prompt=True)
    inputs = model.tokenizer(text, add_special_tokens=model.formatter.prepend_bos, return_tensors="pt").to(model.device)
    config = model.generation_config(sampling)
    config.num_return_sequences = n
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    with torch.no_grad():
        out = model.model.generate(**inputs, generation_config=config)
    start = inputs["input_ids"].shape[1]
    return [model.tokenizer.decode(row[start:], skip_special_tokens=True).strip() for row in out]


def answer_prompts(model, prompts: list[str], sampling: Sampling, *, system: str | None = None, as_json: bool = False,
                   write: Callable[[str], None] | None = None) -> None:
    """One fresh conversation per prompt; plain answers separated by blank lines, or JSON lines."""
    write = write or _stdout
    for i, prompt in enumerate(prompts):
        text = answer(model, _conversation(system, [{"role": "user", "content": prompt}]), sampling)
        if as_json:
            write(textio.dumps({"prompt": prompt, "answer": text}, ensure_ascii=False) + "\n")
        else:
            write(("\n" if i else "") + text + "\n")


def interactive(model, sampling: Sampling, *, system: str | None = None, read: Callable[[str], str] = input,
                write: Callable[[str], None] | None = None) -> None:
    """The chat loop: each answer streams as it is generated; Ctrl-C stops an answer, Ctrl-D leaves."""
    write = write or _stdout
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    write(f"chatting with {model.target.spec} ({model.target.kind}); {COMMANDS}\n")
    history: list[dict] = []
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt) as exc:
            write("\n")
            if signals.is_sigterm(exc):  # Ctrl-C or Ctrl-D leaves the chat; SIGTERM stops the command
                raise
            return
        command = line.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            history = []
            write("(conversation cleared)\n")
            continue
        if command == "/system" or command.startswith("/system "):
            system = command[len("/system"):].strip() or None
            history = []
            write(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)\n")
            continue
        if command.startswith("/"):
            write(f"unknown command {command.split()[0]}; {COMMANDS}\n")
            continue
        history.append({"role": "user", "content": line})
        write("model> ")
        pieces: list[str] = []
        try:
            for piece in model.stream(_conversation(system, history), sampling):
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt as exc:
            if signals.is_sigterm(exc):  # Ctrl-C stops one answer; SIGTERM stops the command
                write("\n")
                raise
            write(" [stopped]")
        write("\n")
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # each piece as it comes, even when stdout is a pipe


def _conversation(system: str | None, turns: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + list(turns)


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file: one per line, or JSON lines with a 'prompt' field."""
    return [prompt for _, prompt in read_prompt_lines(path)]


def read_prompt_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, prompt) for each prompt of a file, so later errors can name the line."""
    prompts = []
    # The one line reader (textio): lines end at "\n" only, so a U+2028 or form feed inside a
    # prompt keeps it whole and every later line number right; binary and huge lines are refused.
    for number, line in textio.text_lines(path, "prompts file"):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                data = textio.loads(line, f"{path} line {number}")
            except FtuneError as exc:
                raise FtuneError(f"expected a JSON object with a 'prompt' field: {exc.message}", place=exc.place) from None
            if not isinstance(data, dict) or "prompt" not in data:
                raise FtuneError("expected a JSON object with a 'prompt' field", place=f"{path} line {number}")
            prompt = data["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise FtuneError(f"'prompt' must be a non-empty string, not {prompt!r:.80}", place=f"{path} line {number}")
            prompts.append((number, prompt))
        else:
            prompts.append((number, line))
    return prompts
