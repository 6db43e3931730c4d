"""The data part's figures and report, for scripts/bench_data.py and bench_report.py: the ratios the goals
judge (summary), this part's rows of the target table (targets) and its section of BENCHMARKS.md (markdown).
It reads a finished report only, so bench_report.py renders the part without importing the benchmark."""

from __future__ import annotations

import os


def summary(report: dict) -> dict:
    """The ratios the goals judge: speed and memory against TRL per size, and the largest size's time over the smallest's."""
    out = {}
    prep = report.get("prep", {})
    for key, part in prep.items():
        f, t = part["medians"]["ftune"], part["medians"]["TRL"]
        out[key] = {"speedup": t["wall_s"] / f["wall_s"], "memory_ratio": f["peak_rss_mib"] / t["peak_rss_mib"]}
    if len(prep) > 1:
        sizes = sorted(prep, key=int)
        small, large = prep[sizes[0]], prep[sizes[-1]]
        out["scaling"] = {"small": int(sizes[0]), "large": int(sizes[-1]), "rows_ratio": int(sizes[-1]) / int(sizes[0]),
                          "time_ratio": large["medians"]["ftune"]["wall_s"] / small["medians"]["ftune"]["wall_s"],
                          "trl_time_ratio": large["medians"]["TRL"]["wall_s"] / small["medians"]["TRL"]["wall_s"]}
    if "training" in report:
        out["training_memory_ratio"] = report["training"]["ratio"]
    return out


def targets(data: dict | None, goals: dict) -> list[dict]:
    """This part's rows of BENCHMARKS.md's target table; `goals` is bench_report.TARGETS."""
    if not data or "summary" not in data:
        return [{"target": "data preparation targets", "goal": "", "measured": "", "status": "not measured"}]
    out, summary, procs = [], data["summary"], data["settings"]["num_proc"]

    def add(name, goal, value, met):
        out.append({"target": name, "goal": goal, "measured": value, "status": "met" if met else "missed"})

    for key in sorted((k for k in summary if k.isdigit()), key=int):
        r, m = summary[key]["speedup"], summary[key]["memory_ratio"]
        add(f"data preparation speed vs TRL SFTTrainer, {int(key):,} rows ({procs} process{'es' if procs > 1 else ''} each)",
            f">= {goals['data_prep_vs_trl']}x", f"{r:.2f}x", r >= goals["data_prep_vs_trl"])
        add(f"data preparation peak RSS / TRL's, {int(key):,} rows", f"<= {goals['data_prep_memory_vs_trl']}", f"{m:.2f}",
            m <= goals["data_prep_memory_vs_trl"])
    scaling = summary.get("scaling")
    if scaling:
        # The goal is for 10x the rows (1M against 100k); for other sizes it scales with the rows.
        goal = goals["data_prep_scaling"] * scaling["rows_ratio"] / 10
        add(f"data preparation time, {scaling['large']:,} rows / {scaling['small']:,} rows", f"<= {goal:g}",
            f"{scaling['time_ratio']:.2f}", scaling["time_ratio"] <= goal)
    if "training_memory_ratio" in summary:
        t = data["training"]
        add(f"training peak RSS, {t['large']:,} cached rows / {t['small']:,}", f"<= {goals['data_training_memory']}",
            f"{summary['training_memory_ratio']:.2f}", summary["training_memory_ratio"] <= goals["data_training_memory"])
    return out


def markdown(data: dict | None, *, baseline: bool = False) -> list[str]:
    """This part's section of BENCHMARKS.md; `baseline`: figures of the pipeline before the streaming one, if kept."""
    if baseline and not data:
        return []
    if not data or "prep" not in data:
        return ["## Data preparation", "", (data or {}).get("skipped", "skipped (--skip data)"), ""]
    s, summary, procs = data["settings"], data.get("summary", {}), data["settings"]["num_proc"]
    title = ("## Data preparation before the streaming pipeline (baseline, scripts/bench_data.py)" if baseline else
             "## Data preparation: ftune against TRL's SFTTrainer dataset preparation (scripts/bench_data.py)")
    lines = [
        title,
        "",
        (f"Alpaca-style rows from `scripts/make_big_dataset.py` (seed 0), the demo model's tokenizer, max length {s['max_length']}, "
         f"packing on both sides, {procs} tokenizing process{'es' if procs > 1 else ''} on each side "
         f"(ftune: {'`data.num_proc`' if s.get('ftune_num_proc_field') else 'no data.num_proc, one process'}; TRL: "
         f"`dataset_num_proc` {procs if procs > 1 else 'None, its default: in the main process'}), {s['threads']} OMP thread(s), "
         f"medians of {s['repeats']} run(s) per side; ftune package: `{s.get('ftune_package', 'ftune')}`. "
         f"Command: `{data['command']}`." + (f" {data['note']}" if data.get("note") else "")
         + (f" Load average before and after: {_load(data['load_before'])}, {_load(data['load_after'])}." if data.get("load_after") else "")),
        "",
        ("| rows | side | wall s | rows/s | ftune is | CPU s | peak RSS MiB (all processes) | ftune / TRL | peak PSS MiB | "
         "main process MiB | processes | tokens | packed rows |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sorted(data["prep"], key=int):
        medians = data["prep"][size]["medians"]
        f = medians["ftune"]
        for side, v in medians.items():
            faster = "" if side == "ftune" else f"{v['wall_s'] / f['wall_s']:.2f}x"
            memory = "" if side == "ftune" else f"{f['peak_rss_mib'] / v['peak_rss_mib']:.2f}"
            pss = f"{v['peak_pss_mib']:,.0f}" if "peak_pss_mib" in v else "-"  # not sampled by the first version of this script
            lines.append(f"| {int(size):,} | {side} | {v['wall_s']:.1f} | {int(size) / v['wall_s']:,.0f} | {faster} | {v['cpu_s']:,.0f} | "
                         f"{v['peak_rss_mib']:,.0f} | {memory} | {pss} | "
                         f"{v['main_peak_rss_mib']:,.0f} | {v['processes']:.0f} | "
                         f"{v['tokens']:,.0f} | {v['packed_rows']:,.0f} |")
    scaling = summary.get("scaling")
    if scaling:
        lines += ["", (f"{scaling['large']:,} rows against {scaling['small']:,} ({scaling['rows_ratio']:g}x the rows): ftune "
                       f"{scaling['time_ratio']:.2f}x the time, TRL {scaling['trl_time_ratio']:.2f}x.")]
    phases = [(size, data["prep"][size]["runs"]["TRL"][0]["phases_s"]) for size in sorted(data["prep"], key=int)]
    lines += ["", "TRL's time by phase (its first run of each size), seconds: "
              + "; ".join(f"{int(size):,} rows: " + ", ".join(f"{k} {v:.1f}" for k, v in p.items()) for size, p in phases) + "."]
    dropped = [(size, data["prep"][size]["medians"]["ftune"]) for size in sorted(data["prep"], key=int)]
    lines += ["", ("ftune's token count differs from TRL's by the samples it drops or cuts (`data.too_long: truncate`, then "
                   "samples left with no answer token dropped; TRL's bfd packing splits a long sample instead): "
                   + "; ".join(f"{int(size):,} rows: {v.get('truncated', 0):,.0f} truncated, "
                               f"{v['dropped'] if 'dropped' in v else int(size) - v['samples']:,.0f} dropped"
                               for size, v in dropped) + ".")]
    training = data.get("training")
    if training:
        lines += ["", (f"Training memory: `ftune sft` for {training['steps']} steps of {training['batch_size']} rows after `ftune inspect` "
                       "built the set's cache, medians:"), "",
                  "| cached rows | peak RSS MiB | main process MiB | wall s | inspect before it, s |", "|---:|---:|---:|---:|---:|"]
        for size in (str(training["small"]), str(training["large"])):
            v = training["medians"][size]
            lines.append(f"| {int(size):,} | {v['peak_rss_mib']:,.0f} | {v['main_peak_rss_mib']:,.0f} | {v['wall_s']:.1f} | "
                         f"{v.get('inspect_s', v.get('cache_build_s', 0)):.1f} |")
        lines += ["", f"Ratio {training['large']:,} / {training['small']:,} rows: **{training['ratio']:.2f}**."]
    lines += ["", METHOD, ""]
    return lines


def _load(load) -> str:
    return " / ".join(f"{x:.2f}" for x in load) + f" (1, 5, 15 min; {os.cpu_count()} cores)"


METHOD = (
    "How: each run is its own process, the sides interleaved. ftune runs the command a user runs, `ftune inspect RECIPE --json` "
    "(what `ftune sft` does to its data, and the inspection's own figures), with `FTUNE_CACHE` an empty folder, so nothing is "
    "reused. TRL runs what its users run before training, with `HF_DATASETS_CACHE` an empty folder: `load_dataset(\"json\")`, "
    "a `map` from the alpaca fields to conversational prompt/completion rows (the conversation ftune builds from an alpaca row), "
    "and `SFTTrainer._prepare_dataset`, the function `SFTTrainer.__init__` calls for its train set (tokenize, build labels, bfd "
    "packing with `packing=True`), without loading a model. Wall time is the process's, start to exit, imports included on both "
    "sides; CPU s is the user + system time of the process and its workers (what a busy machine does not stretch). "
    "Memory is sampled every 0.1 s over the process and every process it starts (both sides fork their workers): "
    "\"all processes\" is the peak of their summed RSS, the goal's figure (a page a forked worker shares with its parent counts "
    "in both, so with workers it is an upper bound); \"PSS\" the peak of their summed proportional set sizes (a page shared by "
    "n processes counts 1/n in each, so the workers' shared pages count once; pages shared with processes outside the run count "
    "less); \"main process\" its own VmHWM. Both sides' `tokens` agree but for the samples ftune cuts or drops, a check that "
    "they did the same work.")
