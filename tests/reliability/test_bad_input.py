"""Bad input, fuzzed: every file a user hands to a stage ends in a one-line error naming the file
(and line or field), or in a counted skip; never a traceback, never a silent drop.

Readers are fuzzed directly (cheap, many examples); a few examples go through the CLI end to end.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from rel_helpers import assert_user_error, captured, cli, records, scripted_simulate

from rlcd import dialogue, preferences, reward, tasks
from rlcd.files import UserError, is_text

# The same examples on every run (derandomize), so that CI is reproducible; when changing a reader,
# search deeper at random with RLCD_FUZZ=20 (twenty times the examples).
SCALE = int(os.environ.get("RLCD_FUZZ", 0))
FUZZ = settings(max_examples=80 * max(SCALE, 1), derandomize=not SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLI_FUZZ = settings(max_examples=25 * max(SCALE, 1), derandomize=not SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# text with what breaks naive code: line separators that str.splitlines() honours but JSON leaves
# raw (U+2028, U+0085), NUL, CR, tabs, emoji, markers inside text
SPECIAL = ["\u2028", "\u2029", "\x85", "\x00", "\r", "\t", " ", "é", "😀", "\ufeff", "Human:", "Assistant:",
           "\n\nHuman:", "\n\nAssistant:", "\\", "`", '"', ",", "\n"]
text = st.lists(st.one_of(st.characters(blacklist_categories=("Cs",)), st.sampled_from(SPECIAL)), max_size=12).map("".join)
LONE = "\ud800"  # what a broken "\ud800" JSON escape decodes to
maybe_lone = st.one_of(text, text.map(lambda t: t + LONE))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), maybe_lone)
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=6)
MARKERS = ["\n\nHuman:", "\n\nAssistant:", "Human:", "Assistant:", "\n\nHuman: Human:", "\n\nAssistant: Assistant:", "\n\n", ""]
dialogue_text = st.lists(st.tuples(st.sampled_from(MARKERS), maybe_lone), min_size=0, max_size=5).map(
    lambda turns: "".join(m + " " + t for m, t in turns))


def fresh_dir():
    return tempfile.TemporaryDirectory(prefix="rlcd-fuzz-")


def check_user_error(e: UserError, path: Path) -> None:
    message = str(e)
    assert "\n" not in message and message.startswith(str(path)), message


def write(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


# ---- hh-rlhf dialogue files (simulate --prompts-file, and eval-rm --data-path) --------------------

line_value = st.one_of(
    st.builds(lambda c, r: {"chosen": c, "rejected": r}, dialogue_text, dialogue_text),
    st.dictionaries(st.sampled_from(["chosen", "rejected", "prompt", "instruction", "question", "other"]), json_value, max_size=3),
    json_value,
)
jsonl_line = st.one_of(
    st.tuples(line_value, st.booleans()).map(lambda v: json.dumps(v[0], ensure_ascii=v[1])),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zl", "Zp", "Cc")), max_size=30),  # not JSON
    st.sampled_from(["", "   ", '{"chosen": "Human: hi\\n\\nAssistant: yo"', "[1, 2", "null", "{}"]),
)


@st.composite
def dialogue_file(draw):
    lines = draw(st.lists(jsonl_line, max_size=12))
    data = "\n".join(lines).encode("utf-8", "surrogatepass")  # a raw lone surrogate: bytes that are not UTF-8
    if draw(st.booleans()):
        data += b"\n"
    if lines and draw(st.integers(0, 5)) == 0:  # a stray byte that is not UTF-8
        data = data.replace(b"{", b"{\xff", 1)
    return lines, data, draw(st.booleans())


def nonblank(lines: list[str]) -> int:
    return sum(bool(line.strip()) for line in lines)


@FUZZ
@given(dialogue_file())
def test_dialogue_files_end_in_prompts_or_counted_skips(case):
    lines, data, gz = case
    with fresh_dir() as d:
        path = write(Path(d) / "prompts.jsonl", data, gz)
        try:
            result = dialogue.load_prompts(path)
        except UserError as e:
            check_user_error(e, path)
            return
        assert len(result.items) + sum(result.skipped.values()) == nonblank(lines)
        assert [i for i, _ in result.items] == sorted({i for i, _ in result.items})
        for _, prompt in result.items:
            assert is_text(prompt) and prompt.startswith("Human:") and prompt.endswith("Assistant:")
            positive, negative = dialogue.contrast_prompts(prompt, "(good)", "(bad)")
            json.dumps([prompt, positive, negative], ensure_ascii=False).encode("utf-8")  # writable as a record


@FUZZ
@given(dialogue_file())
def test_hh_pair_files_for_eval_rm_end_in_pairs_or_counted_skips(case):
    lines, data, gz = case
    with fresh_dir() as d:
        path = write(Path(d) / "pairs.jsonl", data, gz)
        try:
            pairs, skipped, problems = reward.read_hh_pairs(path, None)
        except UserError as e:
            check_user_error(e, path)
            return
        assert len(pairs) + sum(skipped.values()) == nonblank(lines) == len(pairs) + len(problems)
        for chosen, rejected in pairs:
            assert is_text(chosen) and is_text(rejected)


GZ = gzip.compress(b'{"chosen": "Human: hi\\n\\nAssistant: yo"}\n' * 40)


@pytest.mark.parametrize("data", [
    GZ[:-12],  # truncated: EOFError
    GZ[:30] + b"\x00" * 40,  # CRC mismatch: BadGzipFile
    GZ[:10] + bytes([GZ[10] ^ 0xFF]) + GZ[11:],  # corrupt deflate block: zlib.error, not an OSError
    b"plain text, not gzip",
], ids=["truncated", "crc", "deflate", "not-gzip"])
@pytest.mark.parametrize("name", ["prompts.jsonl.gz", "prompts.json.gz"])
def test_broken_gzip_is_one_line_error(tmp_path, data, name):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UserError) as e:
        dialogue.load_prompts(path)
    check_user_error(e.value, path)


def test_a_huge_line_and_a_lone_surrogate(tmp_path):
    path = tmp_path / "p.jsonl"
    huge = "Human: " + "word " * 1_000_000 + "\n\nAssistant: ok"
    path.write_text(json.dumps({"chosen": huge}) + "\n" + '{"chosen": "Human: bad \\ud800 escape\\n\\nAssistant: x"}\n')
    result = dialogue.load_prompts(path)
    assert len(result.items) == 1 and len(result.items[0][1]) > 5_000_000
    assert dict(result.skipped) == {"not valid Unicode (a lone surrogate such as \\ud800)": 1}


_U2028_LINE = json.dumps({"chosen": "Human: a\u2028b\x85c\n\nAssistant: d"}, ensure_ascii=False)
U2028_CASE = ([_U2028_LINE], _U2028_LINE.encode(), False)  # raw U+2028 and U+0085 in a record once broke resume


@CLI_FUZZ
@example(U2028_CASE)
@given(dialogue_file())
def test_simulate_cli_on_fuzzed_prompts_counts_everything_and_resumes(case):
    """Through `rlcd simulate`: exit 0 with records + skipped == lines in, or one error line; a second run
    reads the shard back (U+2028 and U+0085 inside records once broke that) and does nothing."""
    lines, data, gz = case
    with fresh_dir() as d:
        path = write(Path(d) / "prompts.jsonl", data, gz)
        out = Path(d) / "out"
        argv = ["--prompts-file", path, "--out-dir", out, "--batch-size", 3, "--max-attempts", 2]
        code, stdout, err = cli(argv, run=lambda a: scripted_simulate(*a))
        if code != 0:
            assert_user_error((code, err), str(path))
            return
        manifest = json.loads((out / "manifest-r0-of-1.json").read_text())
        assert manifest["status"] == "complete"
        assert len(records(out)) + sum(manifest["counts"]["skipped"].values()) == nonblank(lines)
        assert stdout.strip().splitlines()[-1] == str(out)
        shard = out / "records-r0-of-1.jsonl"
        before = shard.read_bytes() if shard.exists() else None
        code, _, err = cli(argv, run=lambda a: scripted_simulate(*a))
        assert code == 0, err
        assert (shard.read_bytes() if shard.exists() else None) == before


# ---- task files --------------------------------------------------------------------------------

descriptor = st.one_of(text.map(lambda t: f"({t})"), json_value)
near_task = st.fixed_dictionaries(
    {"name": st.one_of(text, json_value),
     "descriptors": st.one_of(st.lists(st.fixed_dictionaries({"positive": descriptor, "negative": descriptor}), max_size=3), json_value),
     "principles": st.one_of(st.lists(maybe_lone, max_size=3), json_value)},
    optional={"extra": json_value},
)
task_doc = st.one_of(
    st.tuples(st.one_of(near_task, json_value), st.booleans()).map(lambda v: yaml.safe_dump(v[0], allow_unicode=v[1]).encode("utf-8", "surrogatepass")),
    st.sampled_from([b"name: x\n1: a\nfoo: b\n", b"name: \xff\n", b'name: "\\ud800"\ndescriptors: []\n', b"descriptors: [\n", b"\t- a", b""]),
    st.binary(max_size=40),
)


@FUZZ
@example(b"name: x\n1: a\nfoo: b\n")  # keys of mixed types once crashed the error message
@example(b"name: \xff\n")  # not UTF-8
@example(b"\x00")  # a YAML reader error spans lines
@example(b'name: t\ndescriptors: [{positive: "(a\\ud800)", negative: "(b)"}]\nprinciples: [p]\n')
@given(task_doc)
def test_task_files_load_or_fail_in_one_line(doc):
    with fresh_dir() as d:
        path = Path(d) / "task.yaml"
        path.write_bytes(doc)
        try:
            task = tasks.load_task(str(path))
        except UserError as e:
            check_user_error(e, path)
            return
        assert task.positive and len(task.positive) == len(task.negative) == len(task.principles)
        for pos, neg in zip(task.positive, task.negative):
            for d_ in (pos, neg):
                assert is_text(d_) and d_.startswith("(") and d_.endswith(")") and ":" not in d_ and "\n" not in d_
            assert pos != neg
        assert all(is_text(p) and p for p in task.principles) and is_text(task.name)


# ---- preference tables (CSV and JSONL) ------------------------------------------------------------

COLUMNS = ["instruction", "prompt", "input", "output_1", "output_2", "preference", "win2_prob", "chosen", "rejected", "index", "score"]
cell = st.one_of(maybe_lone, st.sampled_from(["1", "2", "1.0", "2.0", "1.5", "0", "3", "inf", "-inf", "nan", "true", "", "0.7", "1e400"]),
                 st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none())


@st.composite
def table(draw):
    base = draw(st.sampled_from([["instruction", "input", "output_1", "output_2", "preference"],
                                 ["instruction", "input", "output_1", "output_2", "preference", "win2_prob"],
                                 ["prompt", "chosen", "rejected"]]))
    columns = draw(st.lists(st.sampled_from(COLUMNS), max_size=2)) + base if draw(st.integers(0, 4)) == 0 else base
    if draw(st.integers(0, 6)) == 0:
        columns = columns[:-1]  # a missing column
    columns = list(dict.fromkeys(columns))
    rows = draw(st.lists(st.fixed_dictionaries({c: cell for c in columns}), max_size=8))
    return columns, rows, draw(st.sampled_from(["csv", "jsonl"])), draw(st.booleans())


def render_table(columns, rows, kind, ragged: int | None) -> bytes:
    if kind == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8", "surrogatepass")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for n, r in enumerate(rows):
        values = ["" if r[c] is None else str(r[c]) for c in columns]
        if n == ragged:
            values = values + ["extra"] if n % 2 else values[:-1]
        writer.writerow(values)
    return buf.getvalue().encode("utf-8", "surrogatepass")


@FUZZ
@given(table(), st.one_of(st.none(), st.integers(0, 7)))
def test_preference_tables_end_in_rows_or_counted_skips(case, ragged):
    columns, rows, kind, gz = case
    with fresh_dir() as d:
        path = write(Path(d) / f"table.{kind}", render_table(columns, rows, kind, ragged), gz)
        try:
            got, skipped = preferences.read_table(path)
        except UserError as e:
            check_user_error(e, path)
            return
        assert len(got) + sum(skipped.values()) == len(rows)
        for row in got:
            assert row["preference"] in (1, 2) and type(row["preference"]) is int
            assert all(is_text(row[k]) and row[k].strip() for k in ("prompt", "output_1", "output_2"))
            assert row["win2_prob"] is None or (0 <= row["win2_prob"] <= 1 and not math.isnan(row["win2_prob"]))


@pytest.mark.parametrize("value,kept", [(1, True), ("2", True), ("2.0", True), (1.5, False), ("1.5", False), (True, False),
                                         ("inf", False), ("nan", False), ("", False), (None, False), ([1], False)])
def test_preference_values(tmp_path, value, kept):
    path = tmp_path / "t.jsonl"
    good = {"instruction": "p", "input": "", "output_1": "a", "output_2": "b", "preference": 1}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "preference": value}) + "\n")
    rows, skipped = preferences.read_table(path)
    assert (len(rows), sum(skipped.values())) == ((2, 0) if kept else (1, 1))


def test_table_written_by_consolidate_reads_back_unchanged(tmp_path):
    """CR, U+2028, quotes and commas inside cells survive the CSV round trip (a reader without
    newline="" turned a CR inside a quoted cell into a LF)."""
    rows = [{"instruction": f"Human: q{i} \r\n x\u2028y\x85\n\nAssistant:", "input": "", "output_1": 'a, "b"\r', "output_2": "c\rd",
             "preference": 1 + i % 2} for i in range(4)]
    for suffix in ("csv", "jsonl"):
        path = tmp_path / f"t.{suffix}"
        preferences.write_table(rows, path, scored=False)
        back, skipped = preferences.read_table(path)
        assert not skipped
        assert [(r["prompt"], r["output_1"], r["output_2"], r["preference"]) for r in back] == \
               [(r["instruction"], r["output_1"], r["output_2"], r["preference"]) for r in rows]


# ---- outputs files (rlcd.reward.read_outputs: score, postprocess, compare) ----------------------------------

outputs_doc = st.one_of(
    st.lists(st.dictionaries(st.sampled_from(["instruction", "output", "score", "x"]), json_value, max_size=4), max_size=5),
    st.lists(st.fixed_dictionaries({"instruction": maybe_lone, "output": maybe_lone}), max_size=5),
    json_value,
)


@FUZZ
@given(st.one_of(st.tuples(outputs_doc, st.booleans()).map(lambda v: json.dumps(v[0], ensure_ascii=v[1]).encode("utf-8", "surrogatepass")),
                 st.binary(max_size=30)), st.booleans())
def test_outputs_files_load_or_fail_in_one_line(data, gz):
    with fresh_dir() as d:
        path = write(Path(d) / "outputs.json", data, gz)
        try:
            items = reward.read_outputs(path)
        except UserError as e:
            check_user_error(e, path)
            return
        assert items and all(is_text(it["instruction"]) and is_text(it["output"]) for it in items)
        json.dumps(items, ensure_ascii=False).encode("utf-8")  # scoring can write them back


# ---- simulation shards, damaged (rlcd consolidate) ------------------------------------------------------------

@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    prompts = d / "prompts.json"
    prompts.write_text(json.dumps([f"Question {i}?" for i in range(6)]))
    with captured():
        scripted_simulate("--prompts-file", prompts, "--out-dir", d / "rlaif", "--method", "rlaif", "--max-attempts", 2)
    return d / "rlaif"


@CLI_FUZZ
@given(st.data())
def test_damaged_shards_give_one_line_errors_in_consolidate(shard_dir, data):
    shard = (shard_dir / "records-r0-of-1.jsonl").read_bytes()
    lines = shard.splitlines(keepends=True)
    n = data.draw(st.integers(0, len(lines) - 1))
    how = data.draw(st.sampled_from(["field", "delete", "garbage", "cut", "bytes"]))
    if how in ("field", "delete"):
        record = json.loads(lines[n])
        key = data.draw(st.sampled_from(sorted(record)))
        if how == "delete":
            del record[key]
        else:
            record[key] = data.draw(json_value)
        lines[n] = (json.dumps(record) + "\n").encode("utf-8", "surrogatepass")
    elif how == "garbage":
        lines[n] = data.draw(st.binary(max_size=20)).replace(b"\n", b"") + b"\n"
    elif how == "bytes":
        lines[n] = lines[n][:5] + b"\xff\xfe" + lines[n][5:]
    damaged = b"".join(lines)
    if how == "cut":
        damaged = damaged[: data.draw(st.integers(0, len(damaged)))]
    with fresh_dir() as d:
        in_dir = Path(d) / "sim"
        in_dir.mkdir()
        (in_dir / "records-r0-of-1.jsonl").write_bytes(damaged)
        out = Path(d) / "table.csv"
        code, stdout, err = cli(["consolidate", "--in-dir", str(in_dir), "--out-csv", str(out), "--data-type", "rlaif", "--json"])
        if code == 0:
            summary, last = stdout.strip().splitlines()
            assert last == str(out)
            with open(out, newline="") as f:
                assert len(list(csv.DictReader(f))) == json.loads(summary)["pairs"]
        else:
            assert_user_error((code, err), str(in_dir))


# ---- the same through the CLI of each stage: exit 2, one line, file and line named ----------------

def test_each_stage_reports_bad_files_in_one_line(tmp_path):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"instruction": "p", "output_1": "a", "output_2": "b", "preference": 1}\n'
                         '{"instruction": 5, "output_1": "a", "output_2": "b", "preference": 1}\n')
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("instruction,input,output_1,output_2,preference\np,,a,b,1\np,,a,b,2,extra\n")
    not_gz = tmp_path / "pairs.jsonl.gz"
    not_gz.write_bytes(b"plain")
    outputs = tmp_path / "outputs.json"
    outputs.write_text('[{"instruction": "p", "output": "\\udc80"}]')
    task = tmp_path / "task.yaml"
    task.write_bytes(b"name: t\n7: x\ndescriptors: []\n")
    cases = [
        (["train-rm", "--data", bad_jsonl, "--out-dir", tmp_path / "rm"], [f"{bad_jsonl}:2", "text"]),
        (["train-rm", "--data", ragged, "--out-dir", tmp_path / "rm"], [f"{ragged}:3", "more cells"]),
        (["eval-rm", "--model-path", tmp_path, "--data-path", not_gz], [str(not_gz), "unreadable"]),
        (["score", "--reward-model", tmp_path, "--data-path", outputs, "--out-file", tmp_path / "s.json"], [str(outputs), "item 0", "'output'"]),
        (["simulate", "--prompts-file", not_gz, "--task", task, "--out-dir", tmp_path / "sim"], [str(task), "unknown key"]),
        (["simulate", "--prompts-file", not_gz, "--out-dir", tmp_path / "sim"], [str(not_gz), "unreadable"]),
    ]
    for argv, fragments in cases:
        code, _, err = cli([str(a) for a in argv], run=(lambda a: scripted_simulate(*a[1:])) if argv[0] == "simulate" else None)
        assert_user_error((code, err), *fragments)
    assert not (tmp_path / "rm").exists() and not (tmp_path / "sim").exists() and not (tmp_path / "s.json").exists()
