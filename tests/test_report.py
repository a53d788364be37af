"""rlcd report: hand-made run directories in the documented layout -> report.md, report.html, plots."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_untrusted_text import CONTROL, hostile, markdown_parser, one_line, text_of  # hostile text, and reading Markdown back

from rlcd import report as report_mod
from rlcd.cli import main
from rlcd.text import terminal_safe

LONG_OUTPUT = "I can help with that. " * 60  # over the collapse limit: shown under <details>
HOSTILE = "Sure: <script>alert('x')</script> & </details></div> | done"  # must come out as text


def write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")


def outputs(texts: list[str], scores: list[float] | None = None) -> list[dict]:
    items = [{"instruction": f"\n\nHuman: question {i}?\n\nAssistant:", "output": t, "num_tokens": 4 * len(t.split())}
             for i, t in enumerate(texts)]
    if scores:
        for item, s in zip(items, scores):
            item["score"] = s
    return items


def ppo_log(steps: int, drift: float) -> str:
    return "".join(json.dumps({"step": s, "reward_mean": drift * s - 0.02 * s, "reward_std": 1.0, "score_mean": drift * s,
                               "kl": 0.5 * s, "entropy": 2.0, "response_length": 40 + s, "missing_marker_frac": 0.1,
                               "clip_frac": 0.05, "value_loss": 0.3, "policy_loss": -0.01, "lr": 1e-5,
                               "time_rollout": 1.0, "time_score": 0.2, "time_train": 0.5}) + "\n" for s in range(1, steps + 1))


def compare(name1: str, name2: str, win_rate: float, ci: list[float], **summary) -> dict:
    return {"version": 1, "in_file1": f"outputs/{name1}.json", "in_file2": f"outputs/{name2}.json", "name1": name1, "name2": name2,
            "judge": "smollm2", "prompt_format": "rlcd",
            "summary": {"n": 3, "win_rate": win_rate, "ci95": ci, "wins": 2, "losses": 1, "ties": 0,
                        "single_order_win_rate": 0.6, "first_position_rate": 0.55, "unparsed": 1,
                        "tokens": {"prompt": 900, "completion": 30}, "cached": 0, "requests": 6, **summary},
            "items": []}


def make_run(root: Path, parts: set[str] | None = None) -> Path:
    """A small run directory with every artifact the report reads (or only `parts` of them)."""
    want = (lambda part: parts is None or part in parts)
    if want("config"):
        write(root / "config.yaml", "task: harmless\nmodel: smollm2\n")
    if want("pipeline"):
        write(root / "pipeline.json", {"stages": [
            {"stage": "simulate", "name": "rlcd", "status": "done", "seconds": 3725.0, "outputs": ["simulate/rlcd"]},
            {"stage": "train-rm", "name": "rlcd", "status": "done", "seconds": 95.5, "outputs": ["rm/rlcd"]},
            {"stage": "ppo", "name": "rlcd-ppo", "status": "skipped", "seconds": 0.0, "outputs": []}]})
    if want("prefs"):
        write(root / "prefs/rlcd.csv", "instruction,input,output_1,output_2,preference\n"
                                        "q1,,a short one,a much longer answer here,2\nq2,,one two three,four,1\n")
        write(root / "prefs/rlaif.csv", "instruction,input,output_1,output_2,preference,win2_prob\n"
                                         "q1,,x y,z,1,0.25\nq2,,x,y z w,1,0.9\n")
    if want("rm"):
        write(root / "rm/rlcd/eval.json", {"pairs": 200, "accuracy": 0.625, "accuracy_ci95": [0.555, 0.69], "mean_prob": 0.571,
                                           "ties": 0, "skipped": {"empty": 2}, "model_path": "rm/rlcd", "data_path": "t", "seconds": 3})
        write(root / "rm/rlaif/eval.json", {"pairs": 200, "accuracy": 0.51, "accuracy_ci95": [0.44, 0.58], "mean_prob": 0.502,
                                            "ties": 1, "skipped": {}, "model_path": "rm/rlaif", "data_path": "t", "seconds": 3})
    if want("policy"):
        write(root / "policy/rlcd-ppo/log.jsonl", ppo_log(12, 0.1))
        write(root / "policy/rlaif-ppo/log.jsonl", ppo_log(8, 0.05))
    if want("outputs"):
        write(root / "outputs/base.json", outputs(["plain answer", "another", "third"]))
        write(root / "outputs/base.scored.json", outputs(["plain answer", "another", "third"], [-0.5, 0.1, -0.2]))
        write(root / "outputs/base.scored.json.manifest.json", {"stage": "score"})
        write(root / "outputs/rlcd-ppo.scored.json", outputs([HOSTILE, LONG_OUTPUT, "ok"], [1.5, 0.8, 1.1]))
        write(root / "outputs/rlaif-ppo.json", outputs(["fine", "also fine", "x"]))
    if want("compare"):
        write(root / "compare/base-vs-rlcd-ppo.json", compare("base", "rlcd-ppo", 0.625, [0.55, 0.7]))
        write(root / "compare/rlaif-ppo-vs-rlcd-ppo.json", compare("rlaif-ppo", "rlcd-ppo", 0.48, [0.4, 0.56]))
        write(root / "compare/base-vs-rlcd-ppo.json.manifest.json", {"stage": "compare"})
    return root


def report(capsys, *argv: str) -> tuple[Path, str, str]:
    """Run `rlcd report ...`; return (report.html path from the last printed line, report.html text, report.md text)."""
    main(["report", *argv])
    html_path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    return html_path, html_path.read_text(encoding="utf-8"), html_path.with_name("report.md").read_text(encoding="utf-8")


def test_full_run_has_every_section_table_and_plot(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    html_path, page, md = report(capsys, str(run))
    assert html_path == run / "report" / "report.html"
    for heading in ["Pipeline stages", "Preference data", "Reward models: agreement with human labels", "PPO training",
                    "Win rates (LLM judge)", "Outputs: lengths and reward-model scores", "Example outputs side by side",
                    "Configuration"]:
        assert f"## {heading}" in md and heading in page
    assert "Not yet available" not in page and "Skipped inputs" not in page
    for png in ["ppo_curves.png", "win_rates.png", "scores.png"]:
        assert (run / "report" / png).stat().st_size > 5000 and f'src="{png}"' in page and f"]({png})" in md
    # figures as computed from the fixture files
    assert r"| rlcd | 200 | 62.5% \[55.5, 69.0] | 0.571 | 0 | 2 |" in md  # RM agreement
    assert r"| rlcd-ppo vs base | smollm2 | 3 | 62.5% \[55.0, 70.0] | not measured | 2/0/1 | 60.0% | 55.0% | 1 |" in md
    assert "| rlaif | 2 | 0 | 100.0% | 1.5 | 2.0 | 50.0% |" in md  # preferred: 'x y', 'x'; other: 'z', 'y z w'
    assert "| rlcd | 2 | 0 | 0.0% | 4.0 | 2.0 | 100.0% |" in md
    assert "| simulate | rlcd | done | 1 h 02 min | 1 |" in md and "| total |  |  | 1 h 03 min |  |" in md
    assert "| rlcd-ppo | 12 | 0.600 | 0.750 | 3.750 | 47.500 |" in md  # means of steps 3..12
    assert "| base | 3 | 1.3 | 5.3 | -0.200 | 0.300 |" in md  # the scored file stands in for base.json
    assert "| rlaif-ppo | 3 | 1.3 | 5.3 | — | — | — |" in md
    # paired by prompt against base: 1.5 - -0.5, 0.8 - 0.1, 1.1 - -0.2
    assert r"| base | 3 | 1.3 | 5.3 | -0.200 | 0.300 | — |" in md
    assert r"| rlcd-ppo | 3 | 102.3 | 409.3 | 1.133 | 0.351 | +1.333 \[+0.700, +2.000], 3 prompts |" in md
    assert "base.scored.json" not in md and ".manifest" not in md  # manifests beside artifacts are not systems
    # the example outputs are escaped text, long ones collapsed
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;/details&gt;" in page
    assert page.count("<details><summary>show the rest") == 1
    assert "http://" not in page and "https://" not in page  # self-contained
    assert (run / "report" / "manifest.json").exists()


def test_win_rates_show_the_judges_agreement_and_an_uninformative_judge_is_not_a_result(tmp_path, capsys, monkeypatch):
    from matplotlib.axes import Axes

    run = tmp_path / "run"
    measured = {"agreement": 0.61, "ci95": [0.58, 0.64], "n": 1000, "split": "test", "uninformative": False, "file": "a.json"}
    write(run / "compare/base-vs-rlcd-ppo.json", compare("base", "rlcd-ppo", 0.625, [0.55, 0.7], judge_agreement=measured))
    write(run / "compare/sft-vs-rlcd-ppo.json", compare("sft", "rlcd-ppo", 0.5, [0.5, 0.5], first_position_rate=1.0,
                                                       judge_uninformative="picked the first option 100% of the time"))
    # written before compare flagged such judges: the report judges its position bias itself
    write(run / "compare/rlaif-ppo-vs-rlcd-ppo.json", compare("rlaif-ppo", "rlcd-ppo", 0.5, [0.5, 0.5], first_position_rate=0.97))
    pointwise = compare("dpo", "rlcd-ppo", 0.7, [0.6, 0.8], first_position_rate=None, single_order_win_rate=None)
    write(run / "compare/dpo-vs-rlcd-ppo.json", {**pointwise, "judge_mode": "pointwise"})
    bars = []
    barh = Axes.barh
    monkeypatch.setattr(Axes, "barh", lambda self, y, width, **kw: bars.append((y, width)) or barh(self, y, width, **kw))
    _, page, md = report(capsys, str(run))
    assert r"| rlcd-ppo vs base | smollm2 | 3 | 62.5% \[55.0, 70.0] | 61.0% \[58.0, 64.0], 1000 test pairs | 2/0/1 |" in md
    assert ("| rlcd-ppo vs sft | smollm2 | 3 | not a result: judge uninformative (picked the first option 100% of the time) "
            "| not measured |") in md
    assert "| rlcd-ppo vs rlaif-ppo | smollm2 | 3 | not a result: judge uninformative (picked the first option 97% of the time) |" in md
    assert r"| rlcd-ppo vs dpo | smollm2 (pointwise) | 3 | 70.0% \[60.0, 80.0] | not measured | 2/0/1 | — | — | 1 |" in md
    assert r"50.0% \[50.0, 50.0]" not in md and "50.0% [50.0, 50.0]" not in page and "not a result" in page
    # the plot has a bar for the two informative comparisons only (base, then dpo: files in name order)
    assert bars == [(0, 0.625), (1, 0.7)]


def test_the_score_difference_to_base_pairs_outputs_by_prompt_and_needs_base(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"outputs"})
    items = outputs(["a", "b", "c"], [0.0, 1.0, 2.0])
    for n, item in enumerate(items):
        item["index"] = [7, 3, 5][n]  # prompt 7 has no base output
    base = outputs(["x", "y", "z", "w"], [0.5, 0.25, 0.0, 0.0])
    for n, item in enumerate(base):
        item["index"] = [3, 5, 1, 2][n]
    write(run / "outputs/rlcd-ppo.scored.json", items)
    write(run / "outputs/base.scored.json", base)
    md = report(capsys, str(run))[2]
    assert r"| rlcd-ppo | 3 | 1.0 | 4.0 | 1.000 | 1.000 | +1.125 \[+0.500, +1.750], 2 prompts |" in md  # 1.0 - 0.5, 2.0 - 0.25
    (run / "outputs/base.scored.json").unlink()
    (run / "outputs/base.json").unlink()
    md = report(capsys, str(run))[2]
    assert "RM score − base" not in md and "| rlcd-ppo | 3 | 1.0 | 4.0 | 1.000 | 1.000 |\n" in md


def test_only_some_inputs_give_their_sections_and_say_what_is_missing(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"prefs", "rm"})
    _, page, md = report(capsys, str(run), "--out-dir", str(tmp_path / "elsewhere"))
    assert "## Preference data" in md and "## Reward models: agreement with human labels" in md
    for absent in ["PPO training", "Win rates", "Example outputs", "Pipeline stages", "Configuration"]:
        assert f"## {absent}" not in md
    assert "PPO training: no `policy/*/log.jsonl` yet" in md and "<code>compare/*.json</code>" in page
    assert not list((tmp_path / "elsewhere").glob("*.png")) and "<img" not in page


def test_unscored_outputs_have_no_score_plot_and_say_so(tmp_path, capsys):
    run = tmp_path / "run"
    write(run / "outputs/base.json", outputs(["a b", "c"]))
    _, page, md = report(capsys, str(run), "--examples", "1")
    assert "Reward-score distributions: no `outputs/*.scored.json` yet" in md and "<img" not in page
    assert "### Prompt 1" in md and "### Prompt 2" not in md


def test_examples_zero_leaves_the_section_out(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"outputs"})
    _, _, md = report(capsys, str(run), "--examples", "0")
    assert "Example outputs" not in md and "## Outputs: lengths" in md


def test_empty_run_gives_a_short_page_saying_what_is_missing(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    _, page, md = report(capsys, str(tmp_path / "run"))
    assert "Nothing to report yet" in md and "Nothing to report yet" in page and "<section" not in page
    for inputs in ["pipeline.json", "prefs/*.csv", "rm/*/eval.json", "policy/*/log.jsonl", "outputs/*.json", "compare/*.json"]:
        assert f"`{inputs}`" in md


def test_malformed_inputs_are_skipped_and_named(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    write(run / "compare/base-vs-rlaif-ppo.json", '{"summary": {"n": 3,')
    write(run / "rm/rlaif/eval.json", {"pairs": 10, "mean_prob": 0.5, "accuracy_ci95": [0.1, 0.2]})
    log = run / "policy/rlaif-ppo/log.jsonl"
    log.write_text(ppo_log(2, 0.1) + "not json\n" + ppo_log(1, 0.1))
    with (run / "policy/rlcd-ppo/log.jsonl").open("a") as f:
        f.write('{"step": 13, "reward_m')  # a torn last line: PPO is still writing
    main(["report", str(run)])
    out, err = capsys.readouterr()
    page = Path(out.strip().splitlines()[-1]).read_text()
    assert "3 input files skipped" in out
    for line in [f"{run}/compare/base-vs-rlaif-ppo.json:1: not valid JSON",
                 f"{run}/rm/rlaif/eval.json: field &#x27;accuracy&#x27; missing or not a number",
                 f"{log}:3: corrupt record"]:
        assert line in page
    assert err.count("skipped ") == 3 and "compare/base-vs-rlaif-ppo.json:1: not valid JSON" in err
    md = (run / "report/report.md").read_text()
    assert "| rlcd-ppo | 12 |" in md and "rlaif-ppo | 8" not in md  # the torn line is ignored; the broken log left out
    assert "| rlcd | 200 |" in md and "| rlaif | 200 |" not in md


def test_refusal_probe_results_get_their_section(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"outputs"})
    write(run / "refusals/prompts.json", [{"instruction": "q", "input": "", "index": 0}])
    write(run / "refusals/base.outputs.json", outputs(["no"]))
    write(run / "refusals/base.json", {"unsafe": {"n": 126, "refusals": 63, "rate": 0.5, "ci95": [0.41, 0.59], "empty": 1},
                                       "safe": {"n": 121, "refusals": 12, "rate": 12 / 121, "ci95": [0.05, 0.15], "empty": 0}})
    write(run / "refusals/rlcd-ppo.json", {"unsafe": {"n": 126}, "safe": {"n": 121, "refusals": 3, "rate": 0.02}})
    _, page, md = report(capsys, str(run))
    assert "## Refusals on the refusal probe" in md
    assert r"| base | 63/126 = 50.0% \[41.0, 59.0] | 12/121 = 9.9% \[5.0, 15.0] | 1 |" in md
    # a malformed summary is skipped and named; the probe's prompts and outputs are not systems
    assert "rlcd-ppo.json: field &#x27;rate&#x27; missing or not a number" in page and "| prompts |" not in md
    assert "base.outputs" not in md


def test_missing_run_dir_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "nope")])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"rlcd report: error: {tmp_path / 'nope'}: no such run directory\n"


# --------------------------------------------------------------------------------------------------
# In a real headless browser
# --------------------------------------------------------------------------------------------------


class _Dom(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: dict[str, list[dict]] = {}

    def handle_starttag(self, tag, attrs):
        self.tags.setdefault(tag, []).append(dict(attrs))


def chromium(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not exe:
        pytest.skip("no Chromium installed (apt-get install chromium); the browser check of the report needs it")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=180)


def test_report_renders_in_headless_chromium(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    html_path, _, _ = report(capsys, str(run))
    shot = tmp_path / "shot.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1200,2000", html_path.as_uri(), tmp_path=tmp_path)
    assert shot.exists(), result.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 0.05 and (pixels.mean(axis=2) < 0.3).mean() > 0.005  # not blank: there is dark text and plots

    dom = chromium("--dump-dom", html_path.as_uri(), tmp_path=tmp_path)
    parser = _Dom()
    parser.feed(dom.stdout)
    assert len(parser.tags.get("table", [])) == 6 and "script" not in parser.tags
    images = [img["src"] for img in parser.tags["img"]]
    assert sorted(images) == ["ppo_curves.png", "scores.png", "win_rates.png"]
    assert all((html_path.parent / src).is_file() for src in images)
    assert len(parser.tags["details"]) == 2  # the long output and the config


# --------------------------------------------------------------------------------------------------
# Untrusted text stays text: outputs, prompts and names read from the run directory, fuzzed
# --------------------------------------------------------------------------------------------------

MD_TOKENS = {"heading_open", "heading_close", "paragraph_open", "paragraph_close", "inline", "fence", "bullet_list_open",
             "bullet_list_close", "list_item_open", "list_item_close", "table_open", "table_close", "thead_open", "thead_close",
             "tbody_open", "tbody_close", "tr_open", "tr_close", "th_open", "th_close", "td_open", "td_close"}
MD_INLINE = {"text", "text_special", "code_inline", "strong_open", "strong_close", "image"}  # code, bold, images: the report's own
HTML_TAGS = {"html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "h3", "h4", "p", "nav", "a", "div", "strong", "ul",
             "li", "section", "span", "table", "thead", "tbody", "tr", "th", "td", "img", "details", "summary", "pre", "code"}
file_name = hostile.map(lambda s: s.replace("/", "∕").replace("\x00", "␀")[:40])  # any name a file can have


class _Text(HTMLParser):
    """The tags of a page, the text of its table cells (by table) and of its prompt and output boxes."""

    def __init__(self):
        super().__init__()
        self.tags, self.tables, self.boxes, self.odd = set(), [], [], []
        self.cell = self.box = None
        self.in_summary = False

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""
        elif tag == "div" and dict(attrs).get("class") in ("prompt", "output"):
            self.box = ""
        elif tag == "summary":
            self.in_summary = True

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None
        elif tag == "div" and self.box is not None:
            self.boxes.append(self.box)
            self.box = None
        elif tag == "summary":
            self.in_summary = False

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data
        if self.box is not None and not self.in_summary:
            self.box += data

    def handle_comment(self, data):
        self.odd.append(data)

    handle_pi = unknown_decl = handle_comment


@settings(max_examples=30, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(texts=["```\n<script>alert(1)</script>\n# heading\n```"] * 9, names=["\x1b[2J\r# x", "\n<b>"])  # the case
@given(texts=st.lists(hostile, min_size=9, max_size=9), names=st.lists(file_name, min_size=2, max_size=2))
def test_untrusted_text_stays_text_in_report_md_html_and_stderr(texts, names):
    import rlcd.report as rpt  # the module: `from rlcd import report` is the function of rlcd's API

    prompt, out1, out2, name1, name2, judge, reason, split, config = texts
    with tempfile.TemporaryDirectory() as d, mock.patch.object(rpt, "plot_win_rates"):  # plots hold no text from the run
        run = Path(d) / f"run{names[0]}"
        write(run / "config.yaml", config)
        write(run / "pipeline.json", {"stages": [{"stage": judge, "name": name1, "status": reason, "seconds": 1.0, "outputs": []}]})
        prompts = [f"{i}{prompt}" for i in range(2)]
        write(run / "outputs/base.json", [{"instruction": p, "output": o} for p, o in zip(prompts, [out1, out2])])
        write(run / f"outputs/s{names[1]}.json", [{"instruction": p, "output": o} for p, o in zip(prompts, [out2 + out1, ""])])
        write(run / "compare/base-vs-s.json", {**compare(name1, name2, 0.5, [0.4, 0.6], judge_uninformative=reason,
                                                         judge_agreement={"agreement": 0.6, "ci95": [0.5, 0.7], "n": 9, "split": split}),
                                               "judge": judge})
        write(run / f"compare/bad{names[1]}.json", "{")  # malformed: its path is quoted on a skipped line
        stderr = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            html_path = rpt.write_report(run, run / "report")
        md, page = html_path.with_name("report.md").read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")
        loaded = rpt.load_run(run)
        sections, _ = rpt.build_sections(loaded, run / "report", 3)
    tables = [[b[1], *b[2]] for _, _, blocks in sections for b in blocks if b[0] == "table"]
    boxes = [text.strip() for _, _, blocks in sections for b in blocks if b[0] == "examples"
             for prompt, items in b[1] for text in [prompt, *(it["output"] for it in items)]]
    fences = boxes + [b[2] for _, _, blocks in sections for b in blocks if b[0] == "pre"]
    assert loaded.skipped and out1.strip() in fences and ["base", f"s{names[1]}"] == list(loaded.outputs)  # not vacuous

    # report.md, parsed back: only the report's own structure; every untrusted string inside a code block or a text node
    tokens = markdown_parser().parse(md)
    assert {t.type for t in tokens} <= MD_TOKENS
    assert {c.type for t in tokens if t.type == "inline" for c in t.children} <= MD_INLINE
    headings = [text_of(tokens[i + 1]) for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings == [one_line(f"rlcd report: {run.name}"), *[h for _, heading, blocks in sections for h in
                        [heading, *[f"Prompt {n}" for b in blocks if b[0] == "examples" for n in range(1, len(b[1]) + 1)]]]]
    assert [t.content for t in tokens if t.type == "fence"] == [terminal_safe(text) + "\n" for text in fences]
    cells = [text_of(tokens[i + 1]) for i, t in enumerate(tokens) if t.type in ("th_open", "td_open")]
    assert cells == [one_line(cell) for table in tables for row in table for cell in row]
    items = [i for i, t in enumerate(tokens) if t.type == "list_item_open"][:len(loaded.skipped)]  # then the missing inputs
    assert [text_of(tokens[i + 2]) for i in items] == [one_line(line) for line in loaded.skipped]

    # report.html: escaped everywhere; the same text in its tables and boxes
    assert "<script" not in page.lower()
    dom = _Text()
    dom.feed(page)
    assert dom.tags <= HTML_TAGS and not dom.odd
    assert dom.tables == [[[terminal_safe(cell) for cell in row] for row in table] for table in tables]
    assert dom.boxes == [terminal_safe(text) for text in boxes]

    # stderr: one line per skipped input, with no control character a terminal would act on
    lines = stderr.getvalue().splitlines()
    assert len(lines) == len(loaded.skipped) and all(line.startswith("skipped ") and not CONTROL.search(line) for line in lines)


def test_a_ppo_run_with_compare_reference_gets_the_gain_panel_and_column(tmp_path, capsys):
    """`rlcd ppo --compare-reference` logs score_gain: the report plots it and averages it; a run without it shows —."""
    run = make_run(tmp_path / "run")
    steps = [json.loads(line) for line in ppo_log(12, 0.1).splitlines()]
    lines = [{**s, "reference_score_mean": -0.2, "score_gain": s["score_mean"] + 0.2} for s in steps]
    write(run / "policy/rlcd-ppo/log.jsonl", "".join(json.dumps(s) + "\n" for s in lines))
    plain_png = tmp_path / "plain.png"
    report_mod.plot_ppo({"rlaif-ppo": steps}, {"rlaif-ppo": "#000000"}, plain_png)
    _, page, md = report(capsys, str(run))
    assert "| system | last step | reward | RM score | KL | response tokens | RM score − starting policy |" in md
    assert "| rlcd-ppo | 12 | 0.600 | 0.750 | 3.750 | 47.500 | 0.950 |" in md  # means of steps 3..12
    assert "| rlaif-ppo | 8 |" in md and md.split("| rlaif-ppo | 8 |")[1].split("\n")[0].endswith("| — |")
    assert "same prompts with the same sampling seeds" in md and "--compare-reference" in page

    def height(png: Path) -> int:
        return int.from_bytes(png.read_bytes()[20:24], "big")  # the PNG header's IHDR height

    assert height(run / "report" / "ppo_curves.png") > height(plain_png)  # a third row of panels
