"""The command line: --config values are parser defaults (required flags satisfiable from the file,
command-line flags win even abbreviated), one-line errors, defaults shown in --help."""

import pytest

from rlcd.cli import main, parse
from rlcd.files import UserError


def config(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_config_file_supplies_required_flags(tmp_path):
    cfg = config(tmp_path, "prompts: p.json\nreward-model: rm\nout-dir: out\nsteps: 3\n")
    args = parse(["ppo", "--config", cfg])
    assert (args.prompts, args.reward_model, args.out_dir, args.steps) == ("p.json", "rm", "out", 3)


@pytest.mark.parametrize("flag, key, given, in_file", [("--batch", "batch-size", 4, 8), ("--se", "seed", 9, 7)])
def test_an_abbreviated_flag_beats_the_file(tmp_path, flag, key, given, in_file):
    cfg = config(tmp_path, f"prompts-file: p.json\nout-dir: o\n{key}: {in_file}\n")
    args = parse(["simulate", "--config", cfg, flag, str(given)])
    assert getattr(args, key.replace("-", "_")) == given
    assert getattr(parse(["simulate", "--config", cfg]), key.replace("-", "_")) == in_file


def test_a_file_value_is_checked_like_a_flag(tmp_path, capsys):
    for text, needle in [("prompts-file: p.json\nbatch-sise: 4\n", "unknown key 'batch-sise'"),
                         ("prompts-file: p.json\nmethod: magic\n", "key 'method': 'magic' is not one of"),
                         ("prompts-file: p.json\nmax-new-tokens: many\n", "key 'max-new-tokens'"),
                         ("- a list\n", "expected a mapping")]:
        cfg = config(tmp_path, text)
        with pytest.raises(SystemExit) as e:
            main(["simulate", "--config", cfg])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and needle in err and cfg in err and "\n" not in err, err


def test_a_refused_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ppo", "--prompts", "p", "--reward-model", "r", "--out-dir", "o", "--stepz", "2"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == "rlcd ppo: error: unrecognized arguments: --stepz 2 (see rlcd ppo --help)"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS" in out and "(default: " in out and "(default: None)" not in out


def test_a_key_may_be_any_name_of_its_flag(tmp_path):
    cfg = config(tmp_path, "in-dir: sim\nout-file: prefs.parquet\ndata-type: rlcd\n")
    assert parse(["consolidate", "--config", cfg]).out_csv == "prefs.parquet"
    cfg = config(tmp_path, "in-dir: sim\nout-csv: prefs.csv\ndata-type: rlcd\n")
    assert parse(["consolidate", "--config", cfg]).out_csv == "prefs.csv"


def test_an_error_line_stays_one_line_whatever_it_quotes(tmp_path, capsys):
    hostile = tmp_path / "a\nfake: line\x1b[31m.jsonl"
    with pytest.raises(SystemExit):
        main(["format-prompts", "--data-path", str(hostile), "--out-file", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "\\x1b" in err


def test_a_bare_flag_in_a_file_means_giving_it(tmp_path):
    base = "prompts: p.json\nreward-model: rm\nout-dir: out\n"
    args = parse(["ppo", "--config", config(tmp_path, base + "no-stop-at-marker: true\nno-scale-rewards: true\n")])
    assert args.stop_at_marker is False and args.reward_scaling == "none"
    assert parse(["ppo", "--config", config(tmp_path, base + "stop-at-marker: false\n")]).stop_at_marker is False  # by the setting's name
    with pytest.raises(UserError, match="key 'no-stop-at-marker': write true to give the flag"):
        parse(["ppo", "--config", config(tmp_path, base + "no-stop-at-marker: false\n")])
