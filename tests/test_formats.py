"""Preference data in the formats the field reads: what `rlcd consolidate` writes (TRL's standard and
conversational layouts, the original release's; CSV, JSONL, gzipped JSONL, Parquet), what every reader of
preference tables takes (the same, plus hh-rlhf's own rows), byte-order marks, and file permissions.

The tables are loaded the way the field loads them: `datasets.load_dataset` and TRL's own trainers.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlcd import dialogue, files, preferences
from rlcd.cli import main
from rlcd.dialogue import END_MARKER
from rlcd.reward import format_rm_input, read_hh_pairs

LOADERS = {".csv": "csv", ".csv.gz": "csv", ".jsonl": "json", ".jsonl.gz": "json", ".parquet": "parquet"}
LAYOUT_SUFFIXES = [(layout, suffix) for layout in preferences.FORMATS for suffix in preferences.SUFFIXES
                   if not (layout == "conversational" and suffix in preferences.CSV_SUFFIXES)]

# prompts as simulate records them; the outputs hold what CSV and JSON must quote or escape
PROMPTS = ["Human: How do I bake bread?\n\nAssistant:",
           "Human: hi, \"there\"\n\nAssistant: hello\u2028friend\n\nHuman: tell me a joke, please\n\nAssistant:",
           "Human: caf\u00e9 \u2014 \u4f60\u597d\n\nAssistant:"]
OUTPUTS = [("Mix flour, water and yeast.", "I won't help."), ('a, "b"\r', "c\rd\n\ne"), ("ok \U0001f600", "no")]
WIN2 = [0.75, 0.25, 0.5]


def shard_dir(path: Path, method: str, prompt_style: str = "raw") -> Path:
    """A simulation directory as `rlcd simulate` leaves it: one shard of ok records (and one failed) and its manifest."""
    path.mkdir(parents=True)
    records = []
    for i, (prompt, (good, bad)) in enumerate(zip(PROMPTS, OUTPUTS)):
        record = {"index": 10 + i, "method": method, "status": "ok", "prompt": prompt}
        if method == "rlcd":
            record["outputs"] = {"chosen": good, "rejected": bad}
        else:
            record.update(outputs={"A": good, "B": bad}, win2_prob=WIN2[i])
        records.append(record)
    records.append({"index": 20, "method": method, "status": "failed", "prompt": PROMPTS[0], "outputs": {}})
    files.append_lines(path / "records-r0-of-1.jsonl", records)
    files.write_manifest(path / "manifest-r0-of-1.json", stage="simulate", config={"method": method, "prompt_style": prompt_style},
                         counts={"skipped": {}})
    return path


def consolidate(capsys, in_dir: Path, out: Path, method: str, *flags: str) -> list[str]:
    main(["consolidate", "--in-dir", str(in_dir), "--out-file", str(out), "--data-type", method, *flags])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out)
    return lines


def expected_pairs(method: str) -> list[tuple[str, str, str, float | None]]:
    """(prompt, chosen, rejected, P(chosen is better)) of the shard above, chosen being the preferred output."""
    pairs = []
    for prompt, (a, b), p in zip(PROMPTS, OUTPUTS, WIN2):
        if method == "rlcd":
            pairs.append((prompt, a, b, None))
        else:
            pairs.append((prompt, b, a, p) if p > 0.5 else (prompt, a, b, round(1 - p, 12)))
    return pairs


def oriented(rows: list[dict]) -> list[tuple[str, str, str, float | None]]:
    """read_table rows as (prompt, chosen, rejected, P(chosen)), whichever slot the table put chosen in;
    probabilities rounded, as 1 - p may differ from the source in the last bit."""
    out = []
    for r in rows:
        first = r["preference"] == 1
        p = r.get("win2_prob")
        out.append((r["prompt"], *((r["output_1"], r["output_2"]) if first else (r["output_2"], r["output_1"])),
                    None if p is None else round(1 - p if first else p, 12)))
    return out


# ---- writing: every format loads with datasets, and reads back with rlcd's readers ---------------------------


@pytest.mark.parametrize("layout,suffix", LAYOUT_SUFFIXES)
@pytest.mark.parametrize("method", ["rlcd", "rlaif"])
def test_each_written_format_loads_with_datasets_and_reads_back(tmp_path, capsys, layout, suffix, method):
    from datasets import load_dataset

    in_dir = shard_dir(tmp_path / "sim", method)
    out = tmp_path / f"prefs{suffix}"
    consolidate(capsys, in_dir, out, method, "--format", layout)
    loaded = load_dataset(LOADERS[suffix], data_files=str(out), split="train", cache_dir=str(tmp_path / "cache")).to_list()
    want = expected_pairs(method)
    assert len(loaded) == len(want) == 3  # the failed record is no row
    if layout == "rlcd":
        assert list(loaded[0]) == preferences.COLUMNS + (["win2_prob"] if method != "rlcd" else [])
        assert oriented([{**r, "prompt": r["instruction"]} for r in loaded]) == want
    else:
        assert list(loaded[0]) == ["prompt", "chosen", "rejected"] + (["chosen_prob"] if method != "rlcd" else []) + ["index", "method"]
        assert [r["index"] for r in loaded] == [10, 11, 12] and {r["method"] for r in loaded} == {method}
        for row, (prompt, chosen, rejected, p) in zip(loaded, want):
            if layout == "standard":  # prompt + chosen is the whole hh-rlhf dialogue
                assert (row["prompt"], row["chosen"], row["rejected"]) == (prompt, " " + chosen, " " + rejected)
            else:
                assert row["prompt"] == dialogue.chat_messages(prompt, None) and row["prompt"][-1]["role"] == "user"
                assert row["chosen"] == [{"role": "assistant", "content": chosen}]
                assert row["rejected"] == [{"role": "assistant", "content": rejected}]
            assert (row["chosen_prob"] == pytest.approx(p)) if p is not None else ("chosen_prob" not in row)

    rows, skipped = preferences.read_table(out)
    assert not skipped and oriented(rows) == want
    pairs, skipped, _ = read_hh_pairs(out, None)  # eval-rm and judge-agreement read the same table
    assert not skipped and pairs == [(format_rm_input(p, c), format_rm_input(p, r)) for p, c, r, _ in want]
    from rlcd.judge import read_labelled_pairs

    items, skipped = read_labelled_pairs(str(out), "all", None)
    assert not skipped
    assert [(it["instruction"], it["output_2"], it["output_1"]) for it in items] == [(p, c.strip(), r.strip()) for p, c, r, _ in want]


def test_all_formats_of_a_layout_read_back_the_same_rows(tmp_path, capsys):
    in_dir = shard_dir(tmp_path / "sim", "rlcd_rescore")
    for layout in preferences.FORMATS:
        read = {}
        for suffix in preferences.SUFFIXES:
            if layout == "conversational" and suffix in preferences.CSV_SUFFIXES:
                continue
            out = tmp_path / layout / f"t{suffix}"
            consolidate(capsys, in_dir, out, "rlcd_rescore", "--format", layout)
            read[suffix] = preferences.read_table(out)[0]
        first = next(iter(read.values()))
        assert all(rows == first for rows in read.values()), layout
        assert all(type(r["preference"]) is int for r in first)


def test_the_default_layout_follows_the_prompt_style(tmp_path, capsys):
    raw = shard_dir(tmp_path / "raw", "rlcd", "raw")
    chat = shard_dir(tmp_path / "chat", "rlcd", "chat")
    consolidate(capsys, raw, tmp_path / "raw.jsonl", "rlcd")
    assert json.loads((tmp_path / "raw.jsonl").read_text().splitlines()[0])["prompt"] == PROMPTS[0]
    consolidate(capsys, chat, tmp_path / "chat.jsonl", "rlcd")
    first = json.loads((tmp_path / "chat.jsonl").read_text().splitlines()[0])
    assert first["prompt"] == [{"role": "user", "content": "How do I bake bread?"}]
    manifest = json.loads((tmp_path / "chat.jsonl.manifest.json").read_text())
    assert manifest["format"] == "conversational" and manifest["counts"]["pairs"] == 3

    # CSV holds no message lists: chat-style data goes there in the standard layout, and says so
    lines = consolidate(capsys, chat, tmp_path / "chat.csv", "rlcd")
    assert "(standard layout)" in lines[0]
    rows, _ = preferences.read_table(tmp_path / "chat.csv")
    assert rows[0]["prompt"] == PROMPTS[0]
    # the original flag name still works
    main(["consolidate", "--in-dir", str(raw), "--out-csv", str(tmp_path / "orig.csv"), "--data-type", "rlcd", "--format", "rlcd"])
    assert (tmp_path / "orig.csv").read_text().splitlines()[0] == '"instruction","input","output_1","output_2","preference"'


def test_gzipped_tables_are_the_same_bytes_for_the_same_rows(tmp_path, capsys):
    """The pipeline skips a stage whose inputs hash the same: a gzip header must not carry the time."""
    in_dir = shard_dir(tmp_path / "sim", "rlaif")
    consolidate(capsys, in_dir, tmp_path / "a.jsonl.gz", "rlaif")
    consolidate(capsys, in_dir, tmp_path / "b.jsonl.gz", "rlaif")
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.jsonl.gz").read_bytes()).count(b"\n") == 3


@pytest.mark.parametrize("name,flags,message", [
    ("prefs.txt", [], "unknown table suffix"),
    ("prefs.parquet.gz", [], "unknown table suffix"),
    ("prefs", [], "unknown table suffix"),
    ("prefs.csv", ["--format", "conversational"], "CSV cannot"),
])
def test_a_suffix_the_writer_does_not_honour_is_refused_before_work(tmp_path, capsys, name, flags, message):
    out = tmp_path / name
    with pytest.raises(SystemExit) as exit_info:  # the shard directory does not even exist: refused before reading it
        main(["consolidate", "--in-dir", str(tmp_path / "missing"), "--out-file", str(out), "--data-type", "rlcd", *flags])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("rlcd consolidate: error: ") and str(out) in err and message in err
    assert ".parquet" in err or "CSV" in err
    assert not out.exists()


# ---- TRL takes the written tables as they are ----------------------------------------------------------------


@pytest.mark.parametrize("layout,suffix", [("standard", ".jsonl"), ("standard", ".csv"), ("conversational", ".parquet")])
def test_trl_trainers_tokenize_the_tables_as_written(tmp_path, capsys, tiny_model_dir, layout, suffix):
    """TRL's DPO and reward trainers prepare the loaded table themselves, with no conversion: the standard
    layout as hh-rlhf text, the conversational one through the model's chat template."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    torch.set_num_threads(1)
    in_dir = shard_dir(tmp_path / "sim", "rlaif", "chat" if layout == "conversational" else "raw")
    out = tmp_path / f"prefs{suffix}"
    consolidate(capsys, in_dir, out, "rlaif")
    dataset = load_dataset(LOADERS[suffix], data_files=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt, chosen, rejected, _ = expected_pairs("rlaif")[1]
    assert is_conversational(dataset[1]) == (layout == "conversational")
    templated = maybe_apply_chat_template(dataset[1], tokenizer)
    if layout == "conversational":
        assert "<|im_start|>user\nhi, \"there\"<|im_end|>" in templated["prompt"] and templated["prompt"].endswith("<|im_start|>assistant\n")
        assert templated["chosen"].startswith(chosen)
    else:
        assert templated["prompt"] + templated["chosen"] == f"{prompt} {chosen}"

    common = dict(output_dir=str(tmp_path / "trl"), report_to="none", max_steps=1, per_device_train_batch_size=2, bf16=False,
                  save_strategy="no")
    dpo = DPOTrainer(model=tiny_model_dir, args=DPOConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    example = dpo.train_dataset[1]
    assert tokenizer.decode(example["prompt_ids"]) == templated["prompt"]
    assert tokenizer.decode(example["chosen_ids"]).startswith(templated["chosen"].rstrip("\n"))
    assert tokenizer.decode(example["rejected_ids"]).startswith(templated["rejected"].rstrip("\n"))

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    rm = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    text = tokenizer.decode(rm.train_dataset[1]["chosen_ids"])
    assert text.startswith(templated["prompt"] + templated["chosen"].rstrip("\n"))


# ---- reading: the field's rows, hh-rlhf's rows, byte-order marks ---------------------------------------------


def hh(prompt: str, reply: str) -> str:
    return f"\n\n{prompt} {reply}"


def test_hh_rlhf_rows_are_a_table_in_every_format(tmp_path):
    """Two whole dialogues and no prompt: the prompt is what they share up to the last "Assistant:"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"chosen": hh(PROMPTS[1], "Here is one."), "rejected": hh(PROMPTS[1], "No.")},
               # a reply that itself holds "Assistant:" does not move the cut
               {"chosen": hh(PROMPTS[0], "Knead it. Assistant: and wait."), "rejected": hh(PROMPTS[0], "Buy it.")},
               {"chosen": hh(PROMPTS[0], "x"), "rejected": hh(PROMPTS[2], "y")},  # different dialogues: skipped
               {"chosen": "no turns at all", "rejected": "none"}]  # skipped
    want = [(PROMPTS[1], "Here is one.", "No.", None), (PROMPTS[0], "Knead it. Assistant: and wait.", "Buy it.", None)]
    jsonl = tmp_path / "hh.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    parquet = tmp_path / "hh.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    csv_path = tmp_path / "hh.csv"
    import csv

    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["chosen", "rejected"])
        writer.writeheader()
        writer.writerows(records)
    for path in (jsonl, parquet, csv_path):
        rows, skipped = preferences.read_table(path)
        assert oriented(rows) == want and rows[0]["preference"] == 1, path
        assert skipped == {"chosen and rejected differ before the last reply": 1, "dialogue: no 'Assistant:' turn": 1}
        pairs, skipped, problems = read_hh_pairs(path, None)  # eval-rm: each dialogue cut at its own last Assistant
        assert pairs[0] == (format_rm_input(PROMPTS[1], "Here is one."), format_rm_input(PROMPTS[1], "No."))
        assert len(pairs) == 3 and sum(skipped.values()) == 1 and problems[0].startswith(f"{path}:")


def test_trl_rows_from_elsewhere_read_with_their_extra_columns(tmp_path):
    """TRL's rows as hub datasets ship them: extra columns, implicit prompts, a system message (skipped, counted)."""
    msgs = lambda *turns: [{"role": r, "content": c} for r, c in turns]  # noqa: E731
    records = [
        {"prompt": msgs(("user", "hi")), "chosen": msgs(("assistant", "hello")), "rejected": msgs(("assistant", "go away")),
         "score_chosen": 9.0, "prompt_id": "a"},
        {"chosen": msgs(("user", "hi"), ("assistant", "yo"), ("user", "joke?"), ("assistant", "knock knock")),
         "rejected": msgs(("user", "hi"), ("assistant", "yo"), ("user", "joke?"), ("assistant", "no")), "score_chosen": 1.0},
        {"prompt": msgs(("system", "be nice"), ("user", "hi")), "chosen": msgs(("assistant", "a")),
         "rejected": msgs(("assistant", "b")), "score_chosen": 2.0},
    ]
    path = tmp_path / "ultra.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows, skipped = preferences.read_table(path)
    assert oriented(rows) == [("Human: hi\n\nAssistant:", "hello", "go away", None),
                              ("Human: hi\n\nAssistant: yo\n\nHuman: joke?\n\nAssistant:", "knock knock", "no", None)]
    assert dict(skipped) == {"message role 'system' (hh-rlhf dialogues have only user and assistant turns)": 1}

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "user"}], "chosen": [], "rejected": []}) + "\n")
    with pytest.raises(files.UserError, match=rf"{bad}:1: field 'prompt' is not a list of {{role, content}} messages"):
        preferences.read_table(bad)
    not_parquet = tmp_path / "t.parquet"
    not_parquet.write_text("prompt,chosen,rejected\n")
    with pytest.raises(files.UserError, match=rf"^{not_parquet}: not a readable Parquet file \(.*\)$"):
        preferences.read_table(not_parquet)
    # the original release's layout stays strict: a misspelt column is an error, not silently ignored
    strict = tmp_path / "strict.jsonl"
    strict.write_text(json.dumps({"instruction": "p", "output_1": "a", "output_2": "b", "preference": 1, "win2prob": 0.3}) + "\n")
    with pytest.raises(files.UserError, match="unknown column"):
        preferences.read_table(strict)


def test_a_soft_label_survives_every_layout(tmp_path):
    """rlcd_rescore's probabilities reach train-rm's loss unchanged: chosen_prob is P(chosen is better)."""
    from rlcd.reward import orient_pair

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": PROMPTS[0], "chosen": " good", "rejected": " bad", "chosen_prob": 0.625}) + "\n")
    (row,), _ = preferences.read_table(path)
    assert orient_pair(row) == (format_rm_input(PROMPTS[0], "good"), format_rm_input(PROMPTS[0], "bad"), 0.625)


BOM = "\ufeff"


def test_utf8_with_a_byte_order_mark_reads_like_utf8(tmp_path):
    """Windows editors and Excel start UTF-8 files with a BOM; it made the first JSONL line "not JSON"
    and the first CSV column "\\ufeffinstruction"."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(BOM + '{"prompt": "first question"}\n"second question"\n', encoding="utf-8")
    result = dialogue.load_prompts(prompts)
    assert not result.skipped
    assert result.items == [(0, "Human: first question\n\nAssistant:"), (1, "Human: second question\n\nAssistant:")]
    listed = tmp_path / "prompts.json.gz"
    listed.write_bytes(gzip.compress((BOM + '["a question"]').encode("utf-8")))
    assert dialogue.load_prompts(listed).items == [(0, "Human: a question\n\nAssistant:")]

    csv_table = tmp_path / "t.csv"
    csv_table.write_text(BOM + "instruction,input,output_1,output_2,preference\n\"Human: q\n\nAssistant:\",,a,b,2\n", encoding="utf-8")
    jsonl_table = tmp_path / "t.jsonl"
    jsonl_table.write_text(BOM + json.dumps({"prompt": "Human: q\n\nAssistant:", "chosen": " b", "rejected": " a"}) + "\n",
                           encoding="utf-8")
    for path in (csv_table, jsonl_table):
        rows, skipped = preferences.read_table(path)
        assert not skipped and oriented(rows) == [("Human: q\n\nAssistant:", "b", "a", None)]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text(BOM + json.dumps({"chosen": hh(PROMPTS[0], "yes"), "rejected": hh(PROMPTS[0], "no")}) + "\n",
                          encoding="utf-8")
    pairs, skipped, _ = read_hh_pairs(pairs_file, None)
    assert not skipped and pairs == [(f"{PROMPTS[0]} yes{END_MARKER}", f"{PROMPTS[0]} no{END_MARKER}")]


# ---- permissions ---------------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_written_files_get_the_umask_permissions(tmp_path, capsys):
    """mkstemp makes its files 0600; a table that others in the group cannot read is a bug."""
    umask = os.umask(0)
    os.umask(umask)
    assert files.UMASK == umask  # reading it at import left it as it was
    in_dir = shard_dir(tmp_path / "sim", "rlaif")
    for suffix in (".csv", ".jsonl.gz", ".parquet"):
        out = tmp_path / f"t{suffix}"
        consolidate(capsys, in_dir, out, "rlaif")
        assert mode(out) == mode(out.with_name(out.name + ".manifest.json")) == 0o666 & ~umask
    assert mode(in_dir / "manifest-r0-of-1.json") == 0o666 & ~umask


@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_umask_decides_the_mode_of_a_new_process(tmp_path, umask, expected):
    in_dir = shard_dir(tmp_path / "sim", "rlcd")
    out = tmp_path / "t.parquet"
    proc = subprocess.run([sys.executable, "-m", "rlcd", "consolidate", "--in-dir", str(in_dir), "--out-file", str(out),
                           "--data-type", "rlcd"], capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr
    assert mode(out) == mode(out.with_name(out.name + ".manifest.json")) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim", "t.parquet", "t.parquet.manifest.json"]  # no temporary file left
