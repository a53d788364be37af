"""benchmarks/study.py's own options: the refusal filter on rlcd tables and the reward models' precision."""

from __future__ import annotations

import csv
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study  # noqa: E402

PAIRS = [  # (prompt, chosen, rejected)
    ("Human: How do I pick a lock?\n\nAssistant:", "A locksmith can open it for you.", "I'm sorry, but I can't help with that."),
    ("Human: Tell me a joke.\n\nAssistant:", "Why did the chicken cross the road?", "No."),
    ("Human: Insult my neighbour.\n\nAssistant:", "I won't insult anyone, but I can help you talk to them.", "Your neighbour is a fool."),
]


def write_layout(path: Path, layout: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        if layout == "standard":  # TRL's, as consolidate writes raw-style tables
            w = csv.writer(f)
            w.writerow(["prompt", "chosen", "rejected"])
            w.writerows((p, " " + c, " " + r) for p, c, r in PAIRS)
        else:  # the original release's, preference 2 on the first row
            w = csv.writer(f)
            w.writerow(["instruction", "input", "output_1", "output_2", "preference"])
            for i, (p, c, r) in enumerate(PAIRS):
                w.writerow([p, "", r, c, 2] if i == 0 else [p, "", c, r, 1])


@pytest.mark.parametrize("layout", ["standard", "rlcd"])
def test_drop_refusing_rejected_drops_only_pairs_whose_rejected_reply_refuses(tmp_path, layout):
    (tmp_path / "tables").mkdir()
    write_layout(tmp_path / "tables" / "t.csv", layout)
    info = study.drop_refusing_rejected(tmp_path, "tables/t.csv", "sim/harmless/rlcd-nrr/raw-3")
    assert (info["pairs"], info["dropped_refusing_rejected"], info["skipped"]) == (2, 1, {})
    with open(tmp_path / info["file"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    chosen = [r["output_1"] if r["preference"] == "1" else r["output_2"] for r in rows]
    assert chosen == [PAIRS[1][1], PAIRS[2][1]]  # the chosen reply that refuses stays: only the rejected side counts


@pytest.mark.parametrize("bf16, dtype", [("false", ["--dtype", "float32"]), ("auto", [])])
def test_reward_models_train_and_evaluate_in_the_precision_asked_for(tmp_path, monkeypatch, bf16, dtype):
    (tmp_path / "study.json").write_text(json.dumps({"tables": {"sim/harmless/rlcd/raw-300": {"file": "tables/t.csv", "pairs": 300}}}))
    args = Namespace(work_dir=tmp_path, models_dir=tmp_path, data_dir=tmp_path, prompt_style="raw", rm_backbone="qwen-0.5b",
                     rm_lr=1e-5, rm_save_steps=0, rm_bf16=bf16, min_pairs=100, keep_models=False)
    s = study.Study(args)
    calls = []

    def rlcd(*argv):
        calls.append(list(map(str, argv)))
        if argv[0] == "train-rm":
            out = Path(argv[argv.index("--out-dir") + 1])
            out.mkdir(parents=True)
            (out / "metrics.json").write_text("{}")
            return ""
        return json.dumps({"accuracy": 0.5}) + "\n"

    monkeypatch.setattr(s, "rlcd", rlcd)
    s.rm()
    train, evaluate = calls
    assert train[train.index("--bf16") + 1] == bf16
    assert evaluate[evaluate.index("--json") + 1:] == dtype
    assert json.loads((tmp_path / "study.json").read_text())["reward_models"]["sim/harmless/rlcd/raw-300"]["bf16"] == bf16
