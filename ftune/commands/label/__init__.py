"""`ftune label MODEL --prompts FILE`: from bad answers to preference data.

The error-analysis loop: sample N answers per prompt, decide which are good and which bad
(or which is best), and keep the decisions as training data for `ftune dpo`. Decisions come
from the keys (one prompt at a time, in the terminal), a judge function, or a decisions
file. Everything lives in OUT: the session (answers and decisions, saved after each one),
preferences.jsonl, kto.jsonl and report.md / report.json.

Prompt k (from 0) is sampled with seed SEED+k, so the same command samples the same answers;
they are stored, so a resumed session shows exactly the answers it showed before.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from pathlib import Path

from ftune.commands.label import export, judge as judges, terminal
from ftune.commands.label.session import Session, open_session, replace_outputs, set_answers, start
from ftune.errors import FtuneError

MAX_KEYS = 9  # answers per prompt that a single digit key can pick


class Stopped(FtuneError):
    exit_code = 130


def run(model_spec: str, *, prompts: Path | None, out: Path | None, options: dict, resume: bool = False,
        judge: str | None = None, decisions: Path | None = None, generate_only: bool = False,
        trust_remote_code: bool = False, console=None, say=None, judge_timeout: float | None = None) -> Session:
    from rich.console import Console

    from ftune.commands import chat

    console = console or Console(highlight=False)
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    _check_options(options, judge=judge, decisions=decisions, generate_only=generate_only)
    by_hand = not (judge or decisions or generate_only)
    if by_hand and not sys.stdin.isatty():
        raise FtuneError("labelling by hand needs a terminal", hint="pass --judge path.py:function or --decisions FILE.json to label without one")

    # Everything that can be wrong is checked before anything is written.
    prompt_lines = chat.read_prompt_lines(prompts) if prompts is not None else None
    if out is None:
        if prompts is None:
            raise FtuneError("--prompts FILE is needed to start a labelling session (or --out DIR to continue one)")
        out = Path(f"{prompts.stem}-labels")
    target = chat.resolve(model_spec, trust_remote_code=trust_remote_code)
    model = {"spec": model_spec, "kind": target.kind, "path": str(Path(target.path).resolve()),
             "adapter": str(Path(target.adapter).resolve()) if target.adapter else None}
    if judge_timeout is not None and not judge:
        raise FtuneError("--judge-timeout limits the calls of a --judge function; there is none", hint="pass --judge path.py:function")
    the_judge = judges.load_judge(judge, judge_timeout) if judge else None
    session = open_session(out, model=model, prompts=prompt_lines, prompts_file=str(prompts) if prompts else None,
                           options=options, resume=resume, say=say)
    try:
        _check_sampling(session.sampling, by_hand)
        chosen = judges.read_decisions(decisions, session.items, session.prompts_file) if decisions else []
        wanted = ([d.index for d in chosen] if decisions else range(len(session.items)))
        missing = [i for i in wanted if session.items[i].answers is None and (generate_only or not session.items[i].done)]
        loaded = None
        if missing:  # loaded before a new session is written, so a model that cannot load leaves no trace
            say(f"loading {model_spec} ({target.kind})")
            loaded = chat.load(target)
        start(session)

        def generate(index: int) -> None:
            item, s = session.items[index], session.sampling
            sampling = chat.Sampling(s["max_new_tokens"], s["temperature"], s["top_p"], s["seed"] + index)
            try:
                answers = chat.sample_answers(loaded, [{"role": "user", "content": item.prompt}], sampling, s["n"])
            except FtuneError as exc:  # the chat template on this prompt (raises, runs away): name its line
                raise FtuneError(exc.message, place=exc.place or f"{session.prompts_file} line {item.line}", hint=exc.hint) from None
            set_answers(item, answers)
            session.save()

        with _sigterm_as_interrupt():
            try:
                if generate_only:
                    for i in missing:
                        say(f"sampling {session.sampling['n']} answers to the prompt on line {session.items[i].line}")
                        generate(i)
                elif the_judge is not None:
                    _judge_all(session, the_judge, generate, say)
                elif decisions:
                    _apply_decisions(session, chosen, decisions, generate, say)
                else:
                    with terminal.Keys() as keys:
                        terminal.label(session, generate=generate, console=console, keys=keys)
            except KeyboardInterrupt:
                with contextlib.suppress(FtuneError):
                    replace_outputs(session, export.render(session))
                raise Stopped(f"stopped; every decision so far is saved in {session.path}",
                              hint=f"continue with: {_resume_command(model_spec, session)}") from None
            except FtuneError:
                with contextlib.suppress(FtuneError):
                    replace_outputs(session, export.render(session))
                raise
        texts = export.render(session)
        files = replace_outputs(session, texts)
        export.print_report(json.loads(texts[export.REPORT_JSON]), console, files)
        if session.next_open() is not None:
            say(f"{sum(not item.done for item in session.items)} prompt(s) still open; continue with: {_resume_command(model_spec, session)}")
        return session
    finally:
        session.close()


def _judge_all(session: Session, the_judge, generate, say) -> None:
    for index, item in enumerate(session.items):
        if item.done:
            continue
        if item.answers is None:
            generate(index)
        verdict = judges.ask(the_judge, item, f"{session.prompts_file} line {item.line}")
        if not (verdict.skip or verdict.best is not None or any(label is not None for label in verdict.labels or [])):
            continue
        session.decide(index, f"judge {the_judge.spec}", verdict.apply)
        good, bad = export.good_and_bad(item)
        say(f"line {item.line}: " + ("skipped" if item.skipped else
            f"{len(good)} good, {len(bad)} bad" + (f", best: answer {item.best + 1}" if item.best is not None else "")))


def _apply_decisions(session: Session, chosen, path: Path, generate, say) -> None:
    """All decisions are checked against their answers before any is applied."""
    open_ones = [d for d in chosen if not session.items[d.index].done]
    for d in open_ones:
        if session.items[d.index].answers is None:
            generate(d.index)
    verdicts = [(d, judges.verdict_for(d, session.items[d.index])) for d in open_ones]
    for d, verdict in verdicts:
        session.decide(d.index, f"decisions {path}", verdict.apply)
    left = len(chosen) - len(open_ones)
    say(f"applied {len(verdicts)} decision(s) from {path}" + (f"; {left} were for prompts already decided, which stay as they were" if left else ""))


def _check_options(options: dict, *, judge, decisions, generate_only: bool) -> None:
    given = [name for name, value in (("--judge", judge), ("--decisions", decisions), ("--generate-only", generate_only)) if value]
    if len(given) > 1:
        raise FtuneError(f"{' and '.join(given)} cannot be used together: each decides (or defers) every prompt in its own way")
    n, tokens, temperature, top_p = (options.get(k) for k in ("n", "max_new_tokens", "temperature", "top_p"))
    if n is not None and not 1 <= n <= 64:
        raise FtuneError(f"--n must be between 1 and 64, not {n}")
    if tokens is not None and tokens < 1:
        raise FtuneError(f"--max-new-tokens must be at least 1, not {tokens}")
    if temperature is not None and temperature < 0:
        raise FtuneError(f"--temperature must be 0 (greedy) or more, not {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise FtuneError(f"--top-p must be above 0 and at most 1, not {top_p}")


def _check_sampling(sampling: dict, by_hand: bool) -> None:
    if sampling["temperature"] == 0 and sampling["n"] > 1:
        raise FtuneError(f"--temperature 0 is greedy: all {sampling['n']} answers to a prompt would be the same",
                         hint="sample with a temperature above 0 (e.g. 0.7), or ask for --n 1")
    if by_hand and sampling["n"] > MAX_KEYS:
        raise FtuneError(f"--n {sampling['n']}: labelling by hand picks the best answer with one key, 1 to {MAX_KEYS}",
                         hint=f"ask for --n {MAX_KEYS} or fewer, or label with --judge or --decisions")


def _resume_command(model_spec: str, session: Session) -> str:
    return f"ftune label {model_spec} --out {session.dir} --resume"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the session as Ctrl-C does: outputs written, the terminal restored."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

