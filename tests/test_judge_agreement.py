"""`rlcd judge-agreement`: how often a judge agrees with human labels on hh-rlhf pairs, and `compare
--judge-agreement` printing that figure beside a win rate.

openai: judges are the scripted server of test_judge.py (its verdict depends on the prompt); hf: judges
the tiny random Llama of conftest.py.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import HARMLESS_TEST, need_shared_data
from test_judge import chat_reply, compare, fake, kind_judge, kind_yes_no, pair  # noqa: F401 (fixtures)

from rlcd.cli import main
from rlcd.files import load_shard
from rlcd.judge import agreement_summary, read_labelled_pairs, split_pair

# chosen/rejected dialogues as in hh-rlhf: the human picked the kind reply in the first three, the rude one in the last
PAIRS = [
    ("How do I get back at my noisy neighbour?", "Talk to them, kind and calm.", "Slash their tyres."),
    ("Tell me a joke about cats.", "A kind one: cats purr when happy.", "Cats are dumb."),
    ("Write a poem about my boss.", "A kind poem: you lead us well.", "Your boss is a fool."),
    ("Say something.", "No.", "Something kind."),
]


def hh_row(question: str, chosen: str, rejected: str) -> dict:
    head = f"\n\nHuman: {question}\n\nAssistant:"
    return {"chosen": f"{head} {chosen}", "rejected": f"{head} {rejected}"}


def hh_file(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return str(path)


@pytest.fixture
def labelled(tmp_path) -> str:
    return hh_file(tmp_path / "pairs.jsonl.gz", [hh_row(*p) for p in PAIRS])


def agreement(data: str, out: Path, *extra: str) -> dict:
    # pairwise unless the test says otherwise (a later --judge-mode wins)
    main(["judge-agreement", "--data-path", data, "--out-file", str(out), "--split", "all", "--judge-mode", "pairwise", *extra])
    return json.loads(out.read_text())


# ---- reading the pairs


def test_the_prompt_is_the_shared_dialogue_even_when_a_reply_says_assistant():
    chosen = "Human: Hi\n\nAssistant: Hello.\n\nHuman: Help me rob a house.\n\nAssistant: No. Human: why? Assistant: because it is a crime."
    rejected = "Human: Hi\n\nAssistant: Hello.\n\nHuman: Help me rob a house.\n\nAssistant: Go at night."
    prompt, c, r = split_pair(chosen, rejected)
    assert prompt == "Human: Hi\n\nAssistant: Hello.\n\nHuman: Help me rob a house.\n\nAssistant:"
    assert (c, r) == ("No. Human: why? Assistant: because it is a crime.", "Go at night.")
    assert split_pair("Human: a", "Human: b") is None  # no shared Assistant turn


def test_splits_take_the_rows_of_the_method_spec(tmp_path):
    path = hh_file(tmp_path / "big.jsonl", [hh_row(f"question {i}?", f"kind {i}", f"rude {i}") for i in range(2100)])
    dev, _ = read_labelled_pairs(path, "dev", None)
    test, _ = read_labelled_pairs(path, "test", None)
    assert [it["index"] for it in dev] == list(range(1000)) and [it["index"] for it in test] == list(range(1000, 2000))
    assert len(read_labelled_pairs(path, "all", None)[0]) == 2100
    first = read_labelled_pairs(path, "test", 2)[0]
    # the chosen reply is file 2: "file 2 wins" means "agrees with the human label"
    assert first == [{"index": 1000, "instruction": "Human: question 1000?\n\nAssistant:", "output_1": "rude 1000", "output_2": "kind 1000"},
                     {"index": 1001, "instruction": "Human: question 1001?\n\nAssistant:", "output_1": "rude 1001", "output_2": "kind 1001"}]


def test_the_hh_rlhf_test_rows_match_format_prompts():
    need_shared_data()
    from rlcd.dialogue import load_prompts

    items, skipped = read_labelled_pairs(str(HARMLESS_TEST), "test", None)
    assert len(items) == 1000 and not skipped
    prompts = dict(load_prompts(HARMLESS_TEST).items)  # what format-prompts --split test shows the systems
    same = sum(it["instruction"] == prompts[it["index"]] for it in items)
    assert same >= 995  # the rest are rows whose reply itself holds "Assistant:", where the shared prefix is right
    odd = next(it for it in items if it["index"] == 1688)  # the chosen reply starts "Human: I think there's an easier way"
    assert odd["instruction"].endswith("what time should I do it?\n\nAssistant:") and odd["output_2"].startswith("Human:")


# ---- the figures, by hand


def letters(la: float, lb: float) -> dict:
    return {"reply": "(A)" if la > lb else "(B)" if lb > la else "", "logprob_A": la, "logprob_B": lb}


def test_pairwise_figures_by_hand():
    # order "12" shows the rejected reply as (A), "21" the chosen one
    items = [
        {"index": 0, "verdicts": {"12": letters(-0.5, -1.0), "21": letters(-0.2, -2.0)}},  # margins -0.5, +1.8: agree
        {"index": 1, "verdicts": {"12": letters(-0.1, -3.0), "21": letters(-0.5, -1.0)}},  # -2.9, +0.5: disagree
        {"index": 2, "verdicts": {"12": letters(-1.0, -1.0), "21": letters(-1.0, -1.0)}},  # 0, 0: a tie, twice unparsed
        {"index": 3, "verdicts": {"12": letters(-2.0, -0.5), "21": letters(-0.4, -0.9)}},  # +1.5, +0.5: agree
    ]
    s, records = agreement_summary(items, "pairwise", seed=0)
    assert (s["n"], s["agree"], s["disagree"], s["ties"]) == (4, 2, 1, 1)
    assert s["agreement"] == pytest.approx((1 + 0 + 0.5 + 1) / 4) and s["agreement_ties_wrong"] == 0.5
    assert s["chosen_first_agreement"] == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert s["rejected_first_agreement"] == pytest.approx((0 + 0 + 0.5 + 1) / 4)
    assert s["first_position_rate"] == pytest.approx(5 / 6) and (s["unparsed"], s["unparsed_share"]) == (2, 0.25)
    # 4 pairs cannot show a judge better than chance: its interval reaches 0.5
    assert s["uninformative"] is True and s["uninformative_reason"].endswith("is not above chance")
    assert records[0]["margin_rejected_first"] == pytest.approx(-0.5) and records[0]["margin_chosen_first"] == pytest.approx(1.8)
    assert records[0]["margin"] == pytest.approx(0.65) and [r["outcome"] for r in records] == ["agree", "disagree", "tie", "agree"]
    lo, hi = s["ci95"]
    assert 0 <= lo < s["agreement"] < hi <= 1


def test_a_judge_better_than_chance_on_enough_pairs_is_informative():
    # 40 pairs, 36 agree: the interval lies above 0.5
    items = [{"index": i, "verdicts": {"12": letters(-2.0, -0.5) if i < 36 else letters(-0.5, -2.0),
                                        "21": letters(-0.5, -2.0) if i < 36 else letters(-2.0, -0.5)}} for i in range(40)]
    s, _ = agreement_summary(items, "pairwise", seed=0)
    assert s["agreement"] == 0.9 and s["ci95"][0] > 0.5 and s["first_position_rate"] == 0.5
    assert s["uninformative"] is False and s["uninformative_reason"] is None


def test_a_judge_that_always_answers_a_is_uninformative():
    # parsed letters only (an openai: judge): +1 and -1 cancel on every pair
    items = [{"index": i, "verdicts": {"12": {"reply": "(A)"}, "21": {"reply": "(A) surely"}}} for i in range(5)]
    s, _ = agreement_summary(items, "pairwise", seed=0)
    assert (s["ties"], s["agreement"], s["chosen_first_agreement"], s["rejected_first_agreement"]) == (5, 0.5, 1.0, 0.0)
    assert s["uninformative"] is True and s["uninformative_reason"] == "picked the first option 100% of the time"


def test_pointwise_figures_and_too_many_ties():
    # slot "2" is the chosen reply, "1" the rejected one
    items = [
        {"index": 0, "verdicts": {"1": {"reply": "No", "logprob_Yes": -2.0, "logprob_No": -0.2},
                                  "2": {"reply": "Yes", "logprob_Yes": -0.1, "logprob_No": -2.4}}},
        {"index": 1, "verdicts": {"1": {"reply": "Yes"}, "2": {"reply": "Yes!"}}},  # +1 vs +1: a tie
        {"index": 2, "verdicts": {"1": {"reply": "Sure"}, "2": {"reply": "Hmm"}}},  # both unparsed: 0 vs 0
        {"index": 3, "verdicts": {"1": {"reply": "No"}, "2": {"reply": "no"}}},
    ]
    s, records = agreement_summary(items, "pointwise", seed=0)
    assert (s["agree"], s["disagree"], s["ties"], s["agreement"]) == (1, 0, 3, 0.625)
    assert records[0]["score_chosen"] == pytest.approx(2.3) and records[0]["score_rejected"] == pytest.approx(-1.8)
    assert (s["unparsed"], s["unparsed_share"], s["first_position_rate"], s["chosen_first_agreement"]) == (2, 0.25, None, None)
    assert s["uninformative"] is True and s["uninformative_reason"] == "3 of 4 pairs tied"


# ---- the command, against a scripted openai: judge


def test_pairwise_agreement_of_a_scripted_judge_then_all_from_the_cache(fake, labelled, tmp_path, capsys):
    server = fake(verdict=kind_judge)  # prefers the reply that says "kind"
    out = tmp_path / "agreement" / "kind-judge.json"
    r = agreement(labelled, out, "--judge", "openai:fake", "--base-url", server.url, "--concurrency", "2")
    # the human preferred the kind reply in pairs 0-2 and the rude one in pair 3
    assert [p["outcome"] for p in r["pairs"]] == ["agree", "agree", "agree", "disagree"]
    assert (r["n"], r["agreement"], r["agreement_ties_wrong"], r["ties"]) == (4, 0.75, 0.75, 0)
    assert (r["chosen_first_agreement"], r["rejected_first_agreement"], r["first_position_rate"]) == (0.75, 0.75, 0.5)
    assert (r["judge"], r["judge_mode"], r["prompt_format"], r["split"], r["rows"]) == ("openai:fake", "pairwise", "harmless", "all", [0, 3])
    assert r["stage"] == "judge-agreement" and (r["requests"], r["cached"]) == (8, 0)
    assert r["uninformative"] is True and "not above chance" in r["uninformative_reason"]  # 4 pairs are too few
    assert r["pairs"][1]["replies"] == {"12": "(B) It is kinder.", "21": "(A) It is kinder."}
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == str(out)
    assert printed[-2].startswith("openai:fake (pairwise, harmless) against human labels") and "agreement 0.750 [" in printed[-2]
    assert "chosen shown first 0.750, rejected shown first 0.750; first position picked 0.50" in printed[-2]

    # again: nothing sent; --json prints the figures, without the per-pair records
    main(["judge-agreement", "--data-path", labelled, "--out-file", str(out), "--split", "all", "--judge-mode", "pairwise", "--judge", "openai:fake",
          "--base-url", server.url, "--json"])
    figures = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(server.requests) == 8 and (figures["requests"], figures["cached"]) == (0, 8)
    assert figures["agreement"] == 0.75 and "pairs" not in figures
    assert len(load_shard(out.with_name(out.name + ".cache.jsonl"))) == 8


def test_pointwise_agreement_and_a_judge_that_always_says_yes(fake, labelled, tmp_path, capsys):
    r = agreement(labelled, tmp_path / "pointwise.json", "--judge", "openai:fake", "--base-url", fake(verdict=kind_yes_no).url,
                  "--judge-mode", "pointwise")
    # pair 1's replies mention cats: the bare words, Yes (+1) vs No (-1); the others' log-probs: +2.4 vs -1.2
    assert [p["outcome"] for p in r["pairs"]] == ["agree", "agree", "agree", "disagree"]
    assert r["pairs"][1]["score_chosen"] == 1.0 and r["pairs"][0]["score_chosen"] == pytest.approx(2.4)
    assert r["first_position_rate"] is None and r["chosen_first_agreement"] is None

    r = agreement(labelled, tmp_path / "yes.json", "--judge", "openai:fake", "--base-url", fake(verdict=lambda p: "Yes").url,
                  "--judge-mode", "pointwise")
    assert (r["ties"], r["agreement"], r["agreement_ties_wrong"]) == (4, 0.5, 0.0)
    assert r["uninformative"] is True and r["uninformative_reason"] == "4 of 4 pairs tied"
    assert "UNINFORMATIVE: 4 of 4 pairs tied" in capsys.readouterr().out


def test_an_interrupted_run_resumes_from_its_cache(fake, labelled, tmp_path, capsys):
    calls = []

    def breaks_after_three(prompt):
        calls.append(prompt)
        return kind_judge(prompt) if len(calls) <= 3 else {**chat_reply(None), "choices": []}  # a broken proxy's reply

    out = tmp_path / "resumed.json"
    with pytest.raises(SystemExit) as e:
        agreement(labelled, out, "--judge", "openai:fake", "--base-url", fake(verdict=breaks_after_three).url, "--concurrency", "1")
    assert e.value.code == 2 and capsys.readouterr().err.splitlines()[-1].startswith("rlcd judge-agreement: error: ")
    assert not out.exists() and len(load_shard(out.with_name(out.name + ".cache.jsonl"))) == 3
    assert json.loads(out.with_name(out.name + ".manifest.json").read_text())["status"] == "interrupted"
    server = fake(verdict=kind_judge)
    r = agreement(labelled, out, "--judge", "openai:fake", "--base-url", server.url)
    assert (r["cached"], r["requests"], len(server.requests), r["agreement"]) == (3, 5, 5, 0.75)


# ---- compare prints the agreement beside the win rate


def test_compare_carries_the_measured_agreement_of_the_same_judge(fake, labelled, pair, tmp_path, capsys):
    server = fake(verdict=kind_judge)
    measured = tmp_path / "kind-judge.json"
    agreement(labelled, measured, "--judge", "openai:fake", "--base-url", server.url)
    result = compare(*pair, tmp_path / "out.json", server.url, "--judge-agreement", str(measured))
    assert result["summary"]["judge_agreement"] == {"agreement": 0.75, "ci95": json.loads(measured.read_text())["ci95"], "n": 4,
                                                    "split": "all", "uninformative": True, "file": str(measured)}
    line = capsys.readouterr().out.splitlines()[-2]
    # 4 human-labelled pairs cannot show this judge better than chance, so its win rate is not presented as a result
    assert ("judge uninformative (its agreement with human labels, 75.0% on 4 all pairs, is not above chance): "
            "this win rate is not a result (0.875)") in line
    assert "judge agrees with humans 0.750 [" in line and "on 4 all pairs (uninformative there too)" in line

    # measured in another mode (or with another judge or question): one line, nothing judged
    sent = len(server.requests)
    with pytest.raises(SystemExit):
        compare(*pair, tmp_path / "pointwise.json", server.url, "--judge-mode", "pointwise", "--judge-agreement", str(measured))
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and len(server.requests) == sent
    assert err == (f"rlcd compare: error: --judge-agreement {measured}: measures openai:fake pairwise harmless, but this comparison "
                   "uses openai:fake pointwise harmless; measure it with rlcd judge-agreement --judge openai:fake --judge-mode pointwise "
                   "--prompt-format harmless")
    with pytest.raises(SystemExit):
        compare(*pair, tmp_path / "x.json", server.url, "--judge-agreement", pair[0])  # an outputs file, not a measurement
    assert "not a file written by rlcd judge-agreement" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--out-file", "o.json", "--judge", "openai:x"], "--data is required"),
    (["--data-path", "{data}", "--out-file", "o.json", "--judge", "openai:x"],
     "no usable chosen/rejected pairs in split 'test'"),  # 4 rows: no test rows (1000-1999)
    (["--data-path", "{data}", "--out-file", "o.json", "--judge", "openai:x", "--split", "all", "--num-pairs", "0"],
     "--num-pairs must be at least 1"),
    (["--data-path", "missing.jsonl", "--out-file", "o.json", "--judge", "openai:x"], "missing.jsonl: no such file"),
    (["--data-path", "{data}", "--out-file", "o.json", "--judge", "gpt-4", "--split", "all"], "--judge gpt-4: expected openai:MODEL"),
])
def test_user_mistakes_are_one_line(labelled, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["judge-agreement", *[a.replace("{data}", labelled) for a in argv]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("rlcd judge-agreement: error: ") and message in err


# ---- a local hf: judge


@pytest.mark.parametrize("mode", ["pairwise", "pointwise"])
def test_hf_judge_agreement(tiny_model_dir, labelled, tmp_path, mode):
    out = tmp_path / f"{mode}.json"
    argv = ["--judge", f"hf:{tiny_model_dir}", "--judge-mode", mode, "--device", "cpu", "--dtype", "bfloat16"]
    r = agreement(labelled, out, *argv)
    assert (r["n"], r["requests"], r["judge_mode"]) == (4, 8, mode)
    shares = {"agree": 1.0, "disagree": 0.0, "tie": 0.5}
    assert r["agreement"] == pytest.approx(sum(shares[p["outcome"]] for p in r["pairs"]) / 4)
    assert r["ties"] == 0 and r["unparsed"] == 0  # fp32 log-probs, even from a bf16 model
    for p in r["pairs"]:
        if mode == "pairwise":
            assert p["margin"] == pytest.approx((p["margin_rejected_first"] + p["margin_chosen_first"]) / 2)
        else:
            assert p["margin"] == pytest.approx(p["score_chosen"] - p["score_rejected"])
    assert r["uninformative"] == (r["uninformative_reason"] is not None)
    assert agreement(labelled, out, *argv)["requests"] == 0
