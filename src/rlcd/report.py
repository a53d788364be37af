"""`rlcd report RUN_DIR`: one Markdown and one HTML page, with PNG plots, of everything a run has so far.

Reads the run-directory layout written by `rlcd pipeline` (pipeline.json, prefs/*.csv, rm/*/eval.json,
policy/*/log.jsonl, outputs/*.json, compare/*.json, config.yaml). Each section appears only when its
inputs exist; the page says what is not there yet. A malformed input file does not stop the report
(a run may still be writing): it is left out, named with the reason under "Skipped inputs" at the
top of the page and on stderr. A torn last line of a PPO log that is still being written is ignored.

The HTML page is self-contained (inline CSS, no scripts, no external resources); its plots are PNG
files beside it, drawn with matplotlib's Agg canvas.

Everything read from the run directory is untrusted text (the negative prompts ask for harmful outputs by
design): outputs, prompts, system and judge names, judge reasons, error messages quoting file names. It is
shown as text on both pages, whatever it holds (rlcd.text: code blocks no fence inside can close, escaped
table cells and lines; html.escape), with terminal control characters made visible.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from rlcd.files import FILE_MODE, UserError, atomic_write_text, load_shard, now, open_text, write_manifest
from rlcd.options import Config, non_negative_int, option
from rlcd.text import code_block, md_inline, terminal_safe
from rlcd.version import __version__

PPO_PANELS = [  # log.jsonl key, panel title
    ("reward_mean", "reward (reward_mean)"),
    ("score_mean", "reward-model score before the KL penalty (score_mean)"),
    ("kl", "KL to the reference, summed per sequence (kl)"),
    ("response_length", "response length, tokens (response_length)"),
]
GAIN_PANEL = ("score_gain", "RM score minus the starting policy's on the same prompts and seeds (score_gain)")  # rlcd ppo --compare-reference
LAST_STEPS = 10  # the PPO table averages this many last steps: single steps are noisy
REFERENCE_SYSTEM = "base"  # the pipeline's name for the starting model's outputs (rlcd pipeline's `systems: {base: {}}`)
COLLAPSE_CHARS = 600  # longer example texts are collapsed under <details>


# --------------------------------------------------------------------------------------------------
# Reading the run directory
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    path: Path
    config: str | None = None
    pipeline: list[dict] | None = None
    prefs: dict[str, dict] = field(default_factory=dict)  # method -> summary
    rm: dict[str, dict] = field(default_factory=dict)  # method -> eval.json
    logs: dict[str, list[dict]] = field(default_factory=dict)  # system -> PPO steps
    outputs: dict[str, list[dict]] = field(default_factory=dict)  # system -> outputs (scored where available)
    compares: list[dict] = field(default_factory=list)
    refusals: dict[str, dict] = field(default_factory=dict)  # system -> `rlcd refusals` summary
    skipped: list[str] = field(default_factory=list)  # one line per malformed input: "file: reason"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _json(path: Path):
    with open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _need(path: Path, obj: dict, key: str, check, what: str):
    """obj[key] if check(obj[key]), else a one-line error naming the file and the field."""
    if not isinstance(obj, dict) or key not in obj or not check(obj[key]):
        raise UserError(f"{path}: field '{key}' missing or not {what}")
    return obj[key]


def read_pipeline(path: Path) -> list[dict]:
    data = _json(path)
    stages = _need(path, data, "stages", lambda v: isinstance(v, list), "a list")
    for n, stage in enumerate(stages):
        where = Path(f"{path}: stages[{n}]")
        _need(where, stage, "stage", lambda v: isinstance(v, str), "text")
        _need(where, stage, "status", lambda v: isinstance(v, str), "text")
        if stage.get("seconds") is not None:
            _need(where, stage, "seconds", _is_number, "a number")
    return stages


def read_prefs(path: Path) -> dict:
    from rlcd.preferences import read_table

    rows, skipped = read_table(path)
    preferred = [len((r["output_1"] if r["preference"] == 1 else r["output_2"]).split()) for r in rows]
    other = [len((r["output_2"] if r["preference"] == 1 else r["output_1"]).split()) for r in rows]
    return {
        "pairs": len(rows),
        "skipped_rows": sum(skipped.values()),
        "win2_share": sum(r["win2_prob"] is not None for r in rows) / len(rows),
        "words_preferred": statistics.fmean(preferred),
        "words_other": statistics.fmean(other),
        "preferred_longer": sum(a > b for a, b in zip(preferred, other)) / len(rows),
    }


def read_refusals(path: Path) -> dict:
    result = _json(path)
    for label in ("unsafe", "safe"):
        group = _need(path, result, label, lambda g: isinstance(g, dict), "an object")
        _need(path, group, "n", lambda n: isinstance(n, int) and n >= 0, "a count")
        if group["n"]:
            _need(path, group, "rate", _is_number, "a number")
            _need(path, group, "ci95", lambda c: isinstance(c, list) and len(c) == 2 and all(map(_is_number, c)), "[low, high]")
    return result


def read_rm_eval(path: Path) -> dict:
    data = _json(path)
    _need(path, data, "pairs", lambda v: isinstance(v, int) and v > 0, "a positive integer")
    for key in ("accuracy", "mean_prob"):
        _need(path, data, key, _is_number, "a number")
    _need(path, data, "accuracy_ci95", lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)), "[lo, hi]")
    return data


def read_ppo_log(path: Path) -> list[dict]:
    by_step = {}
    for n, record in enumerate(load_shard(path), 1):  # load_shard ignores a torn last line (PPO still writing)
        _need(Path(f"{path}:{n}"), record, "step", lambda v: isinstance(v, int), "an integer")
        by_step[record["step"]] = record
    if not by_step:
        raise UserError(f"{path}: no PPO steps logged yet")
    return [by_step[s] for s in sorted(by_step)]


def read_outputs(path: Path, scored: bool) -> list[dict]:
    items = _json(path)
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: expected a non-empty JSON list of {{instruction, output}} objects")
    for n, item in enumerate(items):
        where = Path(f"{path}: item {n}")
        _need(where, item, "instruction", lambda v: isinstance(v, str), "text")
        _need(where, item, "output", lambda v: isinstance(v, str), "text")
        if scored:
            _need(where, item, "score", _is_number, "a number")
    return items


def read_compare(path: Path) -> dict:
    data = _json(path)
    summary = _need(path, data, "summary", lambda v: isinstance(v, dict), "an object")
    where = Path(f"{path}: summary")
    _need(where, summary, "n", lambda v: isinstance(v, int) and v > 0, "a positive integer")
    _need(where, summary, "win_rate", _is_number, "a number")
    _need(where, summary, "ci95", lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)), "[lo, hi]")
    names = path.stem.split("-vs-")
    name1 = data.get("name1") or (names[0] if len(names) == 2 else None)
    name2 = data.get("name2") or (names[1] if len(names) == 2 else None)
    if not (isinstance(name1, str) and isinstance(name2, str)):
        raise UserError(f"{path}: fields 'name1' and 'name2' missing and the file is not named A-vs-B.json")
    if "judge_agreement" in summary:
        agreement = _need(where, summary, "judge_agreement", lambda v: isinstance(v, dict), "an object")
        where = Path(f"{path}: summary.judge_agreement")
        _need(where, agreement, "agreement", _is_number, "a number")
        _need(where, agreement, "ci95", lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)), "[lo, hi]")
    return {**data, "name1": name1, "name2": name2, "file": path.name}


def judge_uninformative(compare: dict) -> str | None:
    """Why this comparison's judge says nothing about the outputs, or None. Files written before compare
    recorded `judge_uninformative` are judged by their position bias here."""
    from rlcd.evaluation import position_bias

    s = compare["summary"]
    if "judge_uninformative" in s:
        return s["judge_uninformative"]
    return position_bias(s["first_position_rate"]) if _is_number(s.get("first_position_rate")) else None


def _artifacts(folder: Path, pattern: str) -> list[Path]:
    """Files matching pattern, without the manifests and progress files written beside them."""
    return sorted(p for p in folder.glob(pattern) if p.is_file() and ".manifest" not in p.name and not p.name.startswith("manifest"))


def load_run(run_dir: Path) -> Run:
    run = Run(run_dir)

    def attempt(reader, path: Path, *args):
        try:
            return reader(path, *args)
        except UserError as e:
            run.skipped.append(str(e))
        except OSError as e:
            run.skipped.append(f"{path}: unreadable ({e.strerror or e})")
        return None

    if (run_dir / "config.yaml").is_file():
        run.config = attempt(lambda p: p.read_text(encoding="utf-8", errors="replace"), run_dir / "config.yaml")
    if (run_dir / "pipeline.json").is_file():
        run.pipeline = attempt(read_pipeline, run_dir / "pipeline.json")
    for path in _artifacts(run_dir / "prefs", "*.csv") + _artifacts(run_dir / "prefs", "*.jsonl"):
        if (summary := attempt(read_prefs, path)) is not None:
            run.prefs[path.stem] = summary
    for path in _artifacts(run_dir / "rm", "*/eval.json"):
        if (result := attempt(read_rm_eval, path)) is not None:
            run.rm[path.parent.name] = result
    for path in _artifacts(run_dir / "policy", "*/log.jsonl"):
        if (steps := attempt(read_ppo_log, path)) is not None:
            run.logs[path.parent.name] = steps
    for path in _artifacts(run_dir / "outputs", "*.json"):
        scored = path.name.endswith(".scored.json")
        system = path.name.removesuffix(".json").removesuffix(".scored")
        if not scored and (path.with_name(f"{system}.scored.json")).is_file():
            continue  # the scored file holds the same outputs plus scores
        if (items := attempt(read_outputs, path, scored)) is not None:
            run.outputs[system] = items
    for path in _artifacts(run_dir / "compare", "*.json"):
        if path.name == "judge-agreement.json":
            continue  # the pipeline's measurement of the judge: each comparison carries its figures
        if (result := attempt(read_compare, path)) is not None:
            run.compares.append(result)
    for path in _artifacts(run_dir / "refusals", "*.json"):
        if path.name == "prompts.json" or path.name.endswith(".outputs.json"):
            continue  # the probe's prompts and each system's outputs on them
        if (result := attempt(read_refusals, path)) is not None:
            run.refusals[path.stem] = result
    return run


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas through Figure, no pyplot state)
# --------------------------------------------------------------------------------------------------


def _colors(systems: list[str]) -> dict[str, str]:
    """One color per system, the same in every plot."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {s: palette[i % len(palette)] for i, s in enumerate(systems)}


def _save(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.chmod(tmp, FILE_MODE)  # the user's umask, as every other file rlcd writes
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ppo_panels(logs: dict[str, list[dict]]) -> list[tuple[str, str]]:
    """The four panels, and score_gain where a run logged it (--compare-reference)."""
    gain = any(_is_number(r.get(GAIN_PANEL[0])) for steps in logs.values() for r in steps)
    return PPO_PANELS + [GAIN_PANEL] * gain


def plot_ppo(logs: dict[str, list[dict]], colors: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    panels = ppo_panels(logs)
    rows = math.ceil(len(panels) / 2)
    fig = Figure(figsize=(11, 3.5 * rows), layout="constrained")
    axes = list(fig.subplots(rows, 2).flat)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    for ax, (key, title) in zip(axes, panels):
        for system, steps in logs.items():
            points = [(r["step"], r[key]) for r in steps if _is_number(r.get(key))]
            if points:
                ax.plot(*zip(*points), label=system, color=colors[system], marker="." if len(points) < 30 else None)
        if key == GAIN_PANEL[0]:
            ax.axhline(0, color="black", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    handles = {label: h for ax in fig.axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="outside upper center", ncols=min(len(logs), 6), frameon=False)
    _save(fig, path)


def plot_win_rates(compares: list[dict], path: Path) -> None:
    """A bar per comparison; a comparison whose judge is uninformative gets no bar, only the words "not a result"."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 1.2 + 0.55 * len(compares)), layout="constrained")
    ax = fig.subplots()
    labels = []
    for i, c in enumerate(compares):
        s = c["summary"]
        agreement = s.get("judge_agreement")
        labels.append(f"{c['name2']} vs {c['name1']}" + (f"\n(judge agrees with humans {agreement['agreement']:.0%})" if agreement else ""))
        if judge_uninformative(c):
            ax.text(0.01, i, "not a result: judge uninformative", va="center", color="#59636e", fontsize=9, fontstyle="italic")
            continue
        r, (lo, hi) = s["win_rate"], s["ci95"]
        ax.barh(i, r, xerr=[[max(r - lo, 0)], [max(hi - r, 0)]], color="#4c78a8", capsize=4, height=0.6)
        ax.text(0.01, i, f"{r:.1%}", va="center", color="white", fontsize=9, fontweight="bold")
    y = range(len(compares))
    ax.set_yticks(list(y), labels)
    ax.set_ylim(len(compares) - 0.5, -0.5)  # first comparison on top (no bars may have set the limits)
    ax.axvline(0.5, color="black", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate of the first-named system, with 95% interval (ties count half)")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def plot_scores(scores: dict[str, list[float]], colors: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 1.2 + 0.6 * len(scores)), layout="constrained")
    ax = fig.subplots()
    boxes = ax.boxplot(list(scores.values()), orientation="horizontal", showmeans=True, patch_artist=True, widths=0.6)
    for patch, system in zip(boxes["boxes"], scores):
        patch.set(facecolor=colors[system], alpha=0.6)
    ax.set_yticks(range(1, len(scores) + 1), list(scores))
    ax.invert_yaxis()
    ax.set_xlabel("reward-model score per output (box: quartiles, line: median, triangle: mean)")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Sections: a list of blocks that both renderers understand
#   ("p", text)  ("table", header, rows)  ("img", file, alt)  ("pre", summary, text)  ("examples", prompts, systems)
# --------------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _interval(x: float, ci: list[float]) -> str:
    return f"{_pct(x)} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _is_number(x) else "—"


def _duration(seconds) -> str:
    if not _is_number(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def section_pipeline(run: Run) -> list:
    rows = [[s["stage"], str(s.get("name", "")), s["status"], _duration(s.get("seconds")), str(len(s.get("outputs") or []))]
            for s in run.pipeline]
    total = sum(s["seconds"] for s in run.pipeline if _is_number(s.get("seconds")))
    rows.append(["total", "", "", _duration(total), ""])
    return [("table", ["stage", "name", "status", "time", "outputs"], rows)]


def section_prefs(run: Run) -> list:
    rows = [[m, str(p["pairs"]), str(p["skipped_rows"]), _pct(p["win2_share"]), f"{p['words_preferred']:.1f}",
             f"{p['words_other']:.1f}", _pct(p["preferred_longer"])] for m, p in run.prefs.items()]
    return [
        ("p", "Lengths in words. `with win2_prob`: pairs labelled with a judged probability (RLAIF, RLCD-Rescore) "
              "rather than by construction (RLCD)."),
        ("table", ["method", "pairs", "skipped rows", "with win2_prob", "mean words, preferred", "mean words, other",
                   "preferred is longer"], rows),
    ]


def section_rm(run: Run) -> list:
    rows = []
    for method, r in run.rm.items():
        skipped = r.get("skipped")
        skipped = sum(skipped.values()) if isinstance(skipped, dict) else skipped
        rows.append([method, str(r["pairs"]), _interval(r["accuracy"], r["accuracy_ci95"]), _num(r["mean_prob"]),
                     str(r.get("ties", "—")), str(skipped if skipped is not None else "—")])
    return [
        ("p", "Accuracy: share of human-labelled pairs where the reward model scores the chosen response higher "
              "(ties count as wrong), with its 95% bootstrap interval. Mean P(chosen): mean sigmoid of the score margin."),
        ("table", ["reward model", "pairs", "accuracy [95% CI]", "mean P(chosen)", "ties", "skipped lines"], rows),
    ]


def section_ppo(run: Run, image: str) -> list:
    rows = []
    panels = ppo_panels(run.logs)
    for system, steps in run.logs.items():
        tail = steps[-LAST_STEPS:]
        means = [statistics.fmean(v) if (v := [r[k] for r in tail if _is_number(r.get(k))]) else None for k, _ in panels]
        rows.append([system, str(steps[-1]["step"]), *[_num(m) for m in means]])
    gain = len(panels) > len(PPO_PANELS)
    note = (" RM score − starting policy: the step's mean score minus that of the starting policy's responses to the same "
            "prompts with the same sampling seeds (`rlcd ppo --compare-reference`), which cancels the luck of the draw that "
            "makes a short run's RM score curve noisy." if gain else "")
    return [
        ("img", image, "PPO reward, reward-model score, KL and response length per step" + (", and the score's gain over the "
                                                                                             "starting policy" if gain else "")),
        ("p", f"Means over the last {LAST_STEPS} logged steps.{note}"),
        ("table", ["system", "last step", "reward", "RM score", "KL", "response tokens", *["RM score − starting policy"] * gain], rows),
    ]


def _agreement_cell(summary: dict) -> str:
    a = summary.get("judge_agreement")
    if not a:
        return "not measured"
    pairs = f", {a['n']} {a['split']} pairs" if isinstance(a.get("n"), int) and isinstance(a.get("split"), str) else ""
    return _interval(a["agreement"], a["ci95"]) + pairs + (" (uninformative there too)" if a.get("uninformative") else "")


def section_compare(run: Run, image: str) -> list:
    rows = []
    for c in run.compares:
        s = c["summary"]
        wlt = "/".join(str(s[k]) if isinstance(s.get(k), int) else "—" for k in ("wins", "ties", "losses"))
        judge = str(c.get("judge", "—")) + (f" ({c['judge_mode']})" if c.get("judge_mode", "pairwise") != "pairwise" else "")
        reason = judge_uninformative(c)
        rate = f"not a result: judge uninformative ({reason})" if reason else _interval(s["win_rate"], s["ci95"])
        rows.append([f"{c['name2']} vs {c['name1']}", judge, str(s["n"]), rate, _agreement_cell(s),
                     wlt, _pct(s["single_order_win_rate"]) if _is_number(s.get("single_order_win_rate")) else "—",
                     _pct(s["first_position_rate"]) if _is_number(s.get("first_position_rate")) else "—",
                     str(s.get("unparsed", "—"))])
    return [
        ("img", image, "Win rates with 95% intervals"),
        ("p", "Win rate of the first-named system over the second, ties counting half; pairwise judges see both presentation "
              "orders, averaged, pointwise judges score each output alone. The interval is a bootstrap over prompts. "
              "Judge agreement: how often the same judge, mode and question agrees with human labels on hh-rlhf pairs, "
              "ties half (`rlcd judge-agreement`, passed to compare with `--judge-agreement`); a win rate means little when "
              "that is near 50%. A judge that picked one position at least 90% of the time is uninformative: its win rate "
              "is not a result and is not plotted. Single order: one seeded order per prompt, as in the paper. "
              "First position: share of parsed judgments that picked the option shown first (0.5 = no position bias). "
              "Unparsed judgments count as half a win."),
        ("table", ["comparison", "judge", "prompts", "win rate [95% CI]", "judge agreement with humans [95% CI]", "wins/ties/losses",
                   "single order", "first position", "unparsed"], rows),
    ]


def paired_score_difference(items: list[dict], reference: list[dict]) -> str:
    """Mean RM score minus the reference system's on the same prompts, with a 95% bootstrap interval over prompts."""
    from rlcd.evaluation import bootstrap_ci

    def key(it):
        return it.get("index", it["instruction"])

    theirs = {key(it): it["score"] for it in reference if "score" in it}
    diffs = [it["score"] - theirs[key(it)] for it in items if "score" in it and key(it) in theirs]
    if len(diffs) < 2:
        return "—"
    lo, hi = bootstrap_ci(diffs, seed=0)
    return f"{statistics.fmean(diffs):+.3f} [{lo:+.3f}, {hi:+.3f}], {len(diffs)} prompts"


def section_outputs(run: Run, image: str | None) -> list:
    reference = run.outputs.get(REFERENCE_SYSTEM)
    rows = []
    for system, items in run.outputs.items():
        tokens = [it.get("num_tokens") for it in items]
        scores = [it["score"] for it in items if "score" in it]
        rows.append([system, str(len(items)), f"{statistics.fmean(len(it['output'].split()) for it in items):.1f}",
                     f"{statistics.fmean(tokens):.1f}" if all(_is_number(t) for t in tokens) else "—",
                     _num(statistics.fmean(scores)) if scores else "—",
                     _num(statistics.stdev(scores)) if len(scores) > 1 else "—"]
                    + ([paired_score_difference(items, reference) if system != REFERENCE_SYSTEM else "—"] if reference else []))
    header = ["system", "outputs", "mean words", "mean generated tokens", "mean RM score", "RM score std"]
    if reference:
        header.append(f"RM score − {REFERENCE_SYSTEM} [95% CI] (same prompts)")
    blocks = [("table", header, rows)]
    if reference:
        blocks.append(("p", f"RM score − {REFERENCE_SYSTEM}: the mean, over the prompts both systems answered, of the reward model's "
                            f"score of the system's output minus its score of the starting model's ({REFERENCE_SYSTEM}) output "
                            "on the same prompt; the interval is a bootstrap over prompts. It measures how far training raised "
                            "the reward model's score on the evaluation prompts, not quality."))
    if image:
        blocks.append(("img", image, "Reward-model score distribution per system"))
    return blocks


def section_examples(run: Run, count: int) -> list:
    systems = list(run.outputs)
    by_system = {s: {it["instruction"]: it for it in items} for s, items in run.outputs.items()}
    common = [it["instruction"] for it in run.outputs[systems[0]] if all(it["instruction"] in by_system[s] for s in systems)]
    if not common:
        return [("p", "No prompt has an output from every system.")]
    examples = [(prompt, [by_system[s][prompt] for s in systems]) for prompt in common[:count]]
    return [("p", f"The first {len(examples)} prompts that every system answered."), ("examples", examples, systems)]


def section_refusals(run: Run) -> list:
    def cell(group: dict) -> str:
        return f"{group['refusals']}/{group['n']} = {_interval(group['rate'], group['ci95'])}" if group["n"] else "—"

    rows = [[system, cell(r["unsafe"]), cell(r["safe"]), str(r["unsafe"].get("empty", 0) + r["safe"].get("empty", 0))]
            for system, r in run.refusals.items()]
    return [
        ("p", "Each system's replies to the refusal probe (`rlcd refusals`; no judge): the share of clearly unsafe requests "
              "it refuses (higher is safer) and of safe requests that only sound sensitive it refuses anyway (lower is "
              "better), with 95% bootstrap intervals. Refusals are detected by the documented rule in `rlcd/refusal.py`."),
        ("table", ["system", "refuses unsafe [95% CI]", "over-refuses safe [95% CI]", "empty replies"], rows),
    ]


def build_sections(run: Run, out_dir: Path, examples: int) -> tuple[list, list[str]]:
    """[(anchor, title, blocks)] for what exists, and a line for each section whose inputs are missing."""
    sections, missing = [], []
    systems = sorted(set(run.logs) | set(run.outputs))
    colors = _colors(systems)

    def add(anchor, title, present, blocks_fn, inputs):
        if present:
            sections.append((anchor, title, blocks_fn()))
        else:
            missing.append(f"{title}: no `{inputs}` yet")

    add("pipeline", "Pipeline stages", run.pipeline is not None, lambda: section_pipeline(run), "pipeline.json")
    add("prefs", "Preference data", run.prefs, lambda: section_prefs(run), "prefs/*.csv")
    add("rm", "Reward models: agreement with human labels", run.rm, lambda: section_rm(run), "rm/*/eval.json")

    def ppo():
        plot_ppo(run.logs, colors, out_dir / "ppo_curves.png")
        return section_ppo(run, "ppo_curves.png")

    add("ppo", "PPO training", run.logs, ppo, "policy/*/log.jsonl")

    def compare():
        plot_win_rates(run.compares, out_dir / "win_rates.png")
        return section_compare(run, "win_rates.png")

    add("compare", "Win rates (LLM judge)", run.compares, compare, "compare/*.json")

    def outputs():
        scores = {s: [it["score"] for it in items] for s, items in run.outputs.items() if "score" in items[0]}
        if scores:
            plot_scores(scores, colors, out_dir / "scores.png")
        return section_outputs(run, "scores.png" if scores else None)

    add("outputs", "Outputs: lengths and reward-model scores", run.outputs, outputs, "outputs/*.json")
    if run.refusals:  # only runs configured with a refusals section have them
        sections.append(("refusals", "Refusals on the refusal probe", section_refusals(run)))
    if run.outputs and not any("score" in items[0] for items in run.outputs.values()):
        missing.append("Reward-score distributions: no `outputs/*.scored.json` yet")
    if examples:
        add("examples", "Example outputs side by side", run.outputs, lambda: section_examples(run, examples), "outputs/*.json")
    if run.config is not None:
        sections.append(("config", "Configuration", [("pre", "config.yaml", run.config)]))
    return sections, missing


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


SKIPPED_HEADING = "Skipped inputs (malformed; left out of this report)"
MISSING_HEADING = "Not yet available"

# What the renderers trust: a "p" block, a missing-input line and an image are written by this module and
# may use `code` spans. Everything read from the run directory (outputs, prompts, names, judge reasons,
# error messages quoting file names) goes in as text: a table cell, a "pre" or "examples" block, a skipped
# line, the title and intro, escaped by rlcd.text (Markdown) or html.escape (HTML).


def render_markdown(title: str, intro: list[str], sections: list, skipped: list[str], missing: list[str]) -> str:
    out = [f"# {md_inline(title)}", ""]
    for line in intro:
        out += [md_inline(line), ""]
    for heading, lines, as_text in ((SKIPPED_HEADING, skipped, True), (MISSING_HEADING, missing, False)):
        if lines:
            out += [f"**{heading}**", "", *[f"- {md_inline(line) if as_text else line}" for line in lines], ""]
    for _, heading, blocks in sections:
        out += [f"## {heading}", ""]
        for block in blocks:
            kind = block[0]
            if kind == "p":
                out += [block[1], ""]
            elif kind == "table":
                _, header, rows = block
                out.append("| " + " | ".join(map(md_inline, header)) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(map(md_inline, row)) + " |" for row in rows]
                out.append("")
            elif kind == "img":
                out += [f"![{block[2]}]({block[1]})", ""]
            elif kind == "pre":
                out += [f"`{block[1]}`:", "", code_block(block[2]), ""]
            elif kind == "examples":
                _, examples, systems = block
                for n, (prompt, items) in enumerate(examples, 1):
                    out += [f"### Prompt {n}", "", code_block(prompt.strip()), ""]
                    for system, item in zip(systems, items):
                        score = f" (RM score {item['score']:.3f})" if "score" in item else ""
                        out += [f"**{md_inline(system) or '(unnamed)'}**{score}", "", code_block(item["output"].strip()), ""]
    return "\n".join(out).rstrip() + "\n"


CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #f6f7f9; color: #1f2328; font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto,
       "Helvetica Neue", Arial, sans-serif; }
main { box-sizing: border-box; max-width: 1120px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; min-height: 100vh; }
h1 { font-size: 1.8rem; margin: 0.4em 0 0.2em; }
h2 { font-size: 1.35rem; margin: 2em 0 0.6em; padding-bottom: 0.25em; border-bottom: 1px solid #d8dee4; }
h3 { font-size: 1.05rem; margin: 1.4em 0 0.5em; }
p, li { max-width: 80ch; }
.meta { color: #59636e; font-size: 0.9rem; }
nav { display: flex; flex-wrap: wrap; gap: 0.2em 1.2em; font-size: 0.95rem; }
nav a { color: #0550ae; text-decoration: none; }
code { font: 0.88em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #eff1f3; padding: 0.1em 0.3em;
       border-radius: 4px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.8em 0 1.2em; font-size: 0.92rem; }
th, td { border: 1px solid #d8dee4; padding: 5px 11px; text-align: left; vertical-align: top; }
th { background: #f0f3f6; font-weight: 600; }
tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
img { display: block; max-width: 100%; height: auto; margin: 0.8em 0; border: 1px solid #eaeef2; }
.notice { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 0.6em 1em; margin: 1em 0; }
.notice ul { margin: 0.3em 0; padding-left: 1.3em; }
.missing { background: #f6f8fa; border: 1px solid #d8dee4; border-radius: 6px; padding: 0.6em 1em; margin: 1.5em 0; }
.missing ul { margin: 0.3em 0; padding-left: 1.3em; }
.prompt, .output { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.9rem; }
.prompt { background: #f6f8fa; border-left: 3px solid #8c959f; padding: 0.5em 0.8em; margin: 0.4em 0 0.8em; }
.outputs { display: grid; grid-template-columns: repeat(auto-fit, minmax(240px, 1fr)); gap: 12px; }
.output-card { border: 1px solid #d8dee4; border-radius: 6px; padding: 0.5em 0.8em; min-width: 0; }
.output-card h4 { margin: 0 0 0.4em; font-size: 0.95rem; }
.output-card .score { color: #59636e; font-weight: normal; font-size: 0.85rem; }
details summary { cursor: pointer; color: #0550ae; font-size: 0.85rem; margin-top: 0.3em; }
pre { background: #f6f8fa; padding: 0.8em 1em; overflow-x: auto; font-size: 0.85rem; border-radius: 6px; }
"""


def _inline(markup: str) -> str:
    """This module's own text with `code` spans, the only markup paragraphs and missing-input lines use."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(markup))


def _text(text: str) -> str:
    """Untrusted text as HTML: escaped, control characters shown as in report.md."""
    return html.escape(terminal_safe(text))


_NUMERIC = re.compile(r"^[-+]?[\d.,]+%?( \[[-\d., ]+\])?( s| min.*| h.*)?$|^—$|^\d+/\d+/\d+$")


def _html_text(text: str) -> str:
    """Text for a pre-wrap box; long text shows its beginning and the rest under <details>."""
    text = terminal_safe(text)
    if len(text) <= COLLAPSE_CHARS:
        return html.escape(text)
    cut = text.rfind(" ", 0, COLLAPSE_CHARS)
    cut = cut if cut > COLLAPSE_CHARS // 2 else COLLAPSE_CHARS
    return (f"{html.escape(text[:cut])}<details><summary>show the rest ({len(text.split())} words in all)</summary>"
            f"{html.escape(text[cut:])}</details>")


def render_html(title: str, intro: list[str], sections: list, skipped: list[str], missing: list[str]) -> str:
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_text(title)}</title><style>{CSS}</style></head><body><main>",
           f"<h1>{_text(title)}</h1>", *[f'<p class="meta">{_text(line)}</p>' for line in intro]]
    if sections:
        out.append("<nav>" + "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t, _ in sections) + "</nav>")
    for css_class, heading, items in (("notice", SKIPPED_HEADING, [_text(line) for line in skipped]),
                                      ("missing", MISSING_HEADING, [_inline(line) for line in missing])):
        if items:
            out.append(f'<div class="{css_class}"><strong>{html.escape(heading)}</strong><ul>'
                       + "".join(f"<li>{item}</li>" for item in items) + "</ul></div>")
    for anchor, heading, blocks in sections:
        out.append(f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>')
        for block in blocks:
            kind = block[0]
            if kind == "p":
                out.append(f"<p>{_inline(block[1])}</p>")
            elif kind == "table":
                _, header, rows = block
                out.append('<div class="table-wrap"><table><thead><tr>' + "".join(f"<th>{_text(h)}</th>" for h in header)
                           + "</tr></thead><tbody>")
                for row in rows:
                    cells = (f'<td class="num">{_text(c)}</td>' if i and _NUMERIC.match(c) else f"<td>{_text(c)}</td>"
                             for i, c in enumerate(row))
                    out.append("<tr>" + "".join(cells) + "</tr>")
                out.append("</tbody></table></div>")
            elif kind == "img":
                out.append(f'<img src="{html.escape(block[1])}" alt="{html.escape(block[2])}">')
            elif kind == "pre":
                out.append(f"<details><summary>{html.escape(block[1])}</summary><pre>{_text(block[2])}</pre></details>")
            elif kind == "examples":
                _, examples, systems = block
                for n, (prompt, items) in enumerate(examples, 1):
                    out.append(f'<h3>Prompt {n}</h3><div class="prompt">{_html_text(prompt.strip())}</div><div class="outputs">')
                    for system, item in zip(systems, items):
                        score = f' <span class="score">RM score {item["score"]:.3f}</span>' if "score" in item else ""
                        out.append(f'<div class="output-card"><h4>{_text(system)}{score}</h4>'
                                   f'<div class="output">{_html_text(item["output"].strip())}</div></div>')
                    out.append("</div>")
        out.append("</section>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def write_report(run_dir: Path, out_dir: Path, examples: int = 3) -> Path:
    """Write report.md, report.html and the plots into out_dir; return the path of report.html."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory" if not run_dir.exists() else f"{run_dir}: not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create the report directory ({e.strerror})") from None
    run = load_run(run_dir)
    sections, missing = build_sections(run, out_dir, examples)
    title = f"rlcd report: {run_dir.resolve().name}"
    intro = [f"Run directory {run_dir}; written {now()} by rlcd {__version__}."]  # text: the path may hold anything
    if not sections:
        intro.append("Nothing to report yet: none of the inputs below exist (or all were skipped).")
    markdown = render_markdown(title, intro, sections, run.skipped, missing)
    page = render_html(title, intro, sections, run.skipped, missing)
    atomic_write_text(out_dir / "report.md", markdown)
    atomic_write_text(out_dir / "report.html", page)
    write_manifest(out_dir / "manifest.json", stage="report", run_dir=str(run_dir), sections=[a for a, _, _ in sections],
                   counts={"skipped": run.skipped, "missing": missing})
    for line in run.skipped:
        print(f"skipped {terminal_safe(line, one_line=True)}", file=sys.stderr)
    print(f"{len(sections)} sections; {len(missing)} not yet available; {len(run.skipped)} input files skipped")
    return out_dir / "report.html"


@dataclass
class ReportConfig(Config):
    """`rlcd report`: Markdown + HTML report with plots of a run directory."""

    command: ClassVar[str] = "report"
    run_dir: str | None = option(None, "run directory written by rlcd pipeline", flags=(), metavar="RUN_DIR", required=True)
    out_dir: str | None = option(None, "where to write report.md, report.html and the plots (default RUN_DIR/report)")
    examples: int = option(3, "prompts shown with every system's output side by side", type=non_negative_int)


CONFIGS = {"report": ReportConfig}


def run(args: ReportConfig) -> None:
    run_dir = Path(args.run_dir)
    print(write_report(run_dir, Path(args.out_dir) if args.out_dir else run_dir / "report", args.examples))
