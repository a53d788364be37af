"""`rlcd pipeline --config run.yaml`: the whole study, stage by stage, resumable; `rlcd demo`: a small one on CPU.

The config names the model, the task, the prompt files and, per stage, the flags of that stage's
own command (the same names as on its command line). The pipeline turns it into a list of
commands — simulate, consolidate, train-rm, eval-rm per simulation method; one training command
per system (ppo, sft, dpo, rloo; `base` is the untrained model); format-prompts, generate and
score per system; compare for each pair; report — and runs each as its own process, so a
stage's memory is freed before the next starts and its log stays in `RUN/logs/`. On Linux
without a GPU a stage is a fork of the pipeline's process, which has imported torch and
transformers once; elsewhere a fresh `python -m rlcd ...`.

A stage is skipped when it finished before with the same command and the same inputs: its key
is a hash of its command line, the keys of the stages it reads from and the contents of the
input files it names. Run the same command again after any interruption: finished stages are
skipped and the interrupted one resumes (every stage command resumes on its own). Change a
setting and only the stages downstream of it run again.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NoReturn

import yaml

from rlcd.files import UserError, atomic_write_text, now
from rlcd.options import Config, option
from rlcd.seeds import DEFAULT_SEED
from rlcd.text import terminal_safe

TRAINERS = {"ppo", "sft", "dpo", "rloo"}
# the compare settings that describe the judge: judge-agreement measures the same judge the same way
JUDGE_FLAGS = ("judge", "judge-mode", "prompt-format", "base-url", "concurrency", "max-retries", "timeout", "max-new-tokens",
               "batch-size", "device", "dtype")
SECTIONS = {"run-dir", "model", "task", "seed", "prompts-file", "test-file", "simulate", "train-rm", "eval-rm", "systems",
            "format-prompts", "generate", "score", "compare", "refusals", "report"}


@dataclass
class Stage:
    name: str
    argv: list[str]
    output: Path
    deps: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # input files outside the run directory


def flags(values: dict | None, where: str) -> list[str]:
    """A mapping of flag names to values as command-line arguments (true: the bare flag; false/null: left out)."""
    argv: list[str] = []
    for key, value in (values or {}).items():
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: key '{key}': expected a single value, got {type(value).__name__}")
        if value is False or value is None:
            continue
        argv.append(f"--{str(key).replace('_', '-')}")
        if value is not True:
            argv.append(str(value))
    return argv


def load_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a mapping (see configs/ for examples)")
    return cfg


def check_config(cfg: dict, where: str) -> None:
    unknown = sorted(set(cfg) - SECTIONS)
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(SECTIONS))})")
    for key in ("prompts-file", "test-file"):
        if not cfg.get(key):
            raise UserError(f"{where}: '{key}' is required")
        if not Path(cfg[key]).exists():
            raise UserError(f"{where}: {key} {cfg[key]}: no such file")
    for key in ("simulate", "train-rm", "eval-rm", "systems", "format-prompts", "generate", "score", "compare", "refusals"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise UserError(f"{where}: '{key}' must be a mapping of flag names to values")
    methods = (cfg.get("simulate") or {}).get("methods", ["rlcd"])
    if not isinstance(methods, list) or not methods:
        raise UserError(f"{where}: simulate.methods must be a list such as [rlcd, rlaif]")
    for name, system in (cfg.get("systems") or {"base": {}}).items():
        system = system or {}
        if not isinstance(system, dict):
            raise UserError(f"{where}: systems.{name} must be a mapping")
        trainer = system.get("stage")
        if name != "base" and trainer not in TRAINERS:
            raise UserError(f"{where}: systems.{name}.stage must be one of {sorted(TRAINERS)} (got {trainer!r})")
        for ref in ("reward-model", "data"):
            if ref in system and system[ref] not in methods:
                raise UserError(f"{where}: systems.{name}.{ref} '{system[ref]}' is not a simulated method {methods}")


def plan(cfg: dict, run: Path) -> list[Stage]:
    """The stages of a run, in order."""
    model, task, seed = str(cfg.get("model", "smollm2")), str(cfg.get("task", "harmless")), str(cfg.get("seed", DEFAULT_SEED))
    prompts, test = str(cfg["prompts-file"]), str(cfg["test-file"])
    sim = dict(cfg.get("simulate") or {})
    methods = sim.pop("methods", ["rlcd"])
    stages: list[Stage] = []
    for m in methods:
        sim_dir, table, rm = run / "simulate" / m, run / "prefs" / f"{m}.csv", run / "rm" / m
        stages += [
            Stage(f"simulate/{m}", ["simulate", "--method", m, "--task", task, "--model", model, "--prompts-file", prompts,
                                    "--out-dir", str(sim_dir), "--seed", seed, *flags(sim, "simulate")], sim_dir, files=[prompts]),
            Stage(f"consolidate/{m}", ["consolidate", "--in-dir", str(sim_dir), "--out-csv", str(table), "--data-type", m],
                  table, deps=[f"simulate/{m}"]),
            Stage(f"train-rm/{m}", ["train-rm", "--data", str(table), "--model", model, "--out-dir", str(rm), "--resume",
                                    "--seed", seed, *flags(cfg.get("train-rm"), "train-rm")], rm / "metrics.json",
                  deps=[f"consolidate/{m}"]),
            Stage(f"eval-rm/{m}", ["eval-rm", "--model-path", str(rm), "--data-path", test, "--out-file", str(rm / "eval.json"),
                                   *flags(cfg.get("eval-rm"), "eval-rm")], rm / "eval.json", deps=[f"train-rm/{m}"], files=[test]),
        ]
    systems = cfg.get("systems") or {"base": {}}
    policies: dict[str, tuple[str, list[str]]] = {}
    for name, system in systems.items():
        system = dict(system or {})
        trainer = system.pop("stage", None)
        if trainer is None:
            policies[name] = (model, [])
            continue
        out = run / "policy" / name
        rm_method = system.pop("reward-model", methods[0])
        data_method = system.pop("data", methods[0])
        if trainer in ("ppo", "rloo"):
            argv = [trainer, "--prompts", prompts, "--reward-model", str(run / "rm" / rm_method), "--out-dir", str(out)]
            argv += ["--policy", model] if trainer == "ppo" else ["--model", model]
            deps = [f"train-rm/{rm_method}"]
        else:
            argv = [trainer, "--data", str(run / "prefs" / f"{data_method}.csv"), "--model", model, "--out-dir", str(out)]
            deps = [f"consolidate/{data_method}"]
        argv += ["--resume", "--seed", seed, *flags(system, f"systems.{name}")]
        stages.append(Stage(f"{trainer}/{name}", argv, out / "config.json", deps=deps, files=[prompts] if trainer in ("ppo", "rloo") else []))
        policies[name] = (str(out), [f"{trainer}/{name}"])
    test_prompts = run / "prompts.json"
    stages.append(Stage("format-prompts", ["format-prompts", "--data-path", test, "--out-file", str(test_prompts),
                                           *flags(cfg.get("format-prompts"), "format-prompts")], test_prompts, files=[test]))
    score_cfg = dict(cfg.get("score") or {})
    score_rm = score_cfg.pop("reward-model", methods[0])
    for name, (path, deps) in policies.items():
        outputs = run / "outputs" / f"{name}.json"
        stages.append(Stage(f"generate/{name}", ["generate", "--model", path, "--prompts", str(test_prompts), "--out-file", str(outputs),
                                                 "--seed", seed, *flags(cfg.get("generate"), "generate")], outputs,
                            deps=[*deps, "format-prompts"]))
        stages.append(Stage(f"score/{name}", ["score", "--reward-model", str(run / "rm" / score_rm), "--data-path", str(outputs),
                                              "--out-file", str(run / "outputs" / f"{name}.scored.json"), *flags(score_cfg, "score")],
                            run / "outputs" / f"{name}.scored.json", deps=[f"generate/{name}", f"train-rm/{score_rm}"]))
    if cfg.get("refusals") is not None:  # every system on the refusal probe: refusal rates that need no judge
        refusals = dict(cfg["refusals"])
        probe = str(refusals.pop("probe", Path(__file__).parent / "data" / "refusal_probe.jsonl"))
        probe_prompts = run / "refusals" / "prompts.json"
        stages.append(Stage("format-prompts/probe", ["format-prompts", "--data-path", probe, "--split", "all",
                                                     "--out-file", str(probe_prompts)], probe_prompts, files=[probe]))
        generate = {k: v for k, v in (cfg.get("generate") or {}).items() if k != "max-instances"} | refusals
        for name, (path, deps) in policies.items():
            outputs, result = run / "refusals" / f"{name}.outputs.json", run / "refusals" / f"{name}.json"
            stages.append(Stage(f"generate-probe/{name}", ["generate", "--model", path, "--prompts", str(probe_prompts),
                                                           "--out-file", str(outputs), "--seed", seed, *flags(generate, "refusals")],
                                outputs, deps=[*deps, "format-prompts/probe"]))
            stages.append(Stage(f"refusals/{name}", ["refusals", "--in-file", str(outputs), "--probe", probe, "--out-file", str(result),
                                                     "--seed", seed], result, deps=[f"generate-probe/{name}"], files=[probe]))
    compare = dict(cfg.get("compare") or {})
    target = compare.pop("against", None)
    if compare.get("judge") and target:
        if target not in policies:
            raise UserError(f"compare.against '{target}' is not a system ({', '.join(policies)})")
        compare.setdefault("prompt-format", task if task in ("harmless", "helpful") else "harmless")
        # the judge is measured against the human labels of the test file first, and compare prints that beside its win rates
        split, num_pairs = compare.pop("agreement-split", "test"), compare.pop("agreement-pairs", None)
        judge_flags = {k: v for k, v in compare.items() if k in JUDGE_FLAGS}
        judge_flags["num-pairs"] = num_pairs
        agreement = run / "compare" / "judge-agreement.json"
        stages.append(Stage("judge-agreement", ["judge-agreement", "--data-path", test, "--split", split, "--out-file", str(agreement),
                                                "--seed", seed, *flags(judge_flags, "compare")], agreement, files=[test]))
        compare["judge-agreement"] = str(agreement)
        for name in policies:
            if name == target:
                continue
            out = run / "compare" / f"{name}-vs-{target}.json"
            stages.append(Stage(f"compare/{name}-vs-{target}", [
                "compare", "--in-file1", str(run / "outputs" / f"{name}.json"), "--in-file2", str(run / "outputs" / f"{target}.json"),
                "--out-file", str(out), "--name1", name, "--name2", target, "--seed", seed, *flags(compare, "compare")],
                out, deps=[f"generate/{name}", f"generate/{target}", "judge-agreement"]))
    stages.append(Stage("report", ["report", str(run)], run / "report" / "report.html",
                        deps=[s.name for s in stages]))
    return stages


def validate(stages: list[Stage], cfg: dict, where: str) -> None:
    """Parse every stage's command line before any stage runs, so a typo in a late stage's flags
    fails now, in one line naming the config section, not after an hour of training."""
    from rlcd.cli import parse

    systems = {f"{trainer}/{name}" for name, system in (cfg.get("systems") or {}).items()
               for trainer in [(system or {}).get("stage")] if trainer}
    for stage in stages:
        section = f"systems.{stage.name.split('/', 1)[1]}" if stage.name in systems else \
            {"judge-agreement": "compare", "generate-probe": "refusals"}.get(stage.name.split("/")[0], stage.name.split("/")[0])
        try:
            parse(stage.argv)  # the stage's config: flags, required settings and value checks
        except UserError as e:
            raise UserError(f"{where}: {section}: {e}") from None


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Runner:
    def __init__(self, run: Path, stages: list[Stage], may_fork: bool = False):
        self.run, self.stages, self.may_fork = run, stages, may_fork
        self.keys: dict[str, str] = {}
        self.state_path = run / "pipeline.json"
        self.records: list[dict] = []
        self.fork: bool | None = None  # decided at the first stage that runs (fork_stages imports torch)

    def key(self, stage: Stage) -> str:
        parts = [stage.argv, [self.keys[d] for d in stage.deps], [file_digest(f) for f in stage.files]]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def done_marker(self, stage: Stage) -> Path:
        return self.run / ".done" / (stage.name.replace("/", "--") + ".json")

    def save_state(self) -> None:
        atomic_write_text(self.state_path, json.dumps({"updated_at": now(), "stages": self.records}, indent=2) + "\n")

    def execute(self) -> None:
        for stage in self.stages:
            key = self.keys[stage.name] = self.key(stage)
            marker = self.done_marker(stage)
            done = json.loads(marker.read_text()) if marker.exists() else {}
            if done.get("key") == key and stage.output.exists():
                # seconds: what the stage took when it ran
                self.records.append({"stage": stage.name.split("/")[0], "name": stage.name, "status": "skipped",
                                     "seconds": done.get("seconds", 0.0), "outputs": [str(stage.output)]})
                print(f"[{stage.name}] up to date, skipped", flush=True)
                continue
            if marker.exists():  # finished before with other settings or inputs: start this stage afresh
                marker.unlink()
                remove(stage.output.parent if stage.output.name in ("config.json", "metrics.json", "eval.json", "report.html") and
                       stage.name.split("/")[0] in ("ppo", "sft", "dpo", "rloo", "train-rm") else stage.output)
            seconds = self.launch(stage)
            marker.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, json.dumps({"key": key, "argv": stage.argv, "finished_at": now(), "seconds": round(seconds, 1)}) + "\n")
            self.records.append({"stage": stage.name.split("/")[0], "name": stage.name, "status": "done",
                                 "seconds": round(seconds, 1), "outputs": [str(stage.output)]})
            self.save_state()
        self.save_state()

    def launch(self, stage: Stage) -> float:
        log_path = self.run / "logs" / (stage.name.replace("/", "--") + ".log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{stage.name}] rlcd {' '.join(stage.argv)}", flush=True)
        started = time.time()
        if self.fork is None:
            self.fork = self.may_fork and fork_stages()
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n# {now()} rlcd {' '.join(stage.argv)}{'  (forked)' if self.fork else ''}\n")
            log.flush()
            proc = StageProcess(stage.argv, fork=self.fork)
            last = ""
            try:
                for line in proc.lines:
                    log.write(line)
                    if line.strip() and "it/s]" not in line and "s/it]" not in line and "Loading weights" not in line:
                        last = terminal_safe(line.rstrip(), one_line=True)  # a stage's output may quote untrusted text
                        print(f"  {last[:200]}", flush=True)
                code = proc.wait()
            except KeyboardInterrupt:
                proc.stop()
                raise
        if code != 0:
            self.records.append({"stage": stage.name.split("/")[0], "name": stage.name, "status": "failed",
                                 "seconds": round(time.time() - started, 1), "outputs": []})
            self.save_state()
            raise UserError(f"stage {stage.name} failed (exit {code}): {last[:300]} — full log: {log_path}; "
                            "fix the cause and run the same command again to resume")
        return time.time() - started


def fork_stages() -> bool:
    """Whether stages run as forks of this process: on Linux without a GPU. torch and transformers are then imported
    once, here, instead of once a stage (about 8 s each on 2 cores). Elsewhere each stage is a fresh `python -m rlcd`:
    a process forked after CUDA started cannot use it, and macOS does not support every fork. This process must run
    no torch operation before a fork (a child of a process whose OpenMP threads started can hang): the `rlcd`
    command only plans, hashes and relays output, and `run` allows forks only when torch was not imported before."""
    if sys.platform != "linux":
        return False
    import torch

    if torch.cuda.is_available():
        return False
    # what a stage imports before its work starts: transformers, and what loading any model brings in
    import transformers.masking_utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401
    return True


class StageProcess:
    """`rlcd ARGV` in a process of its own (forked from this one, or a fresh interpreter); its stdout and stderr,
    merged, are `lines`. Its memory is freed when it ends, whichever way it starts."""

    def __init__(self, argv: list[str], fork: bool):
        if not fork:
            self.popen = subprocess.Popen([sys.executable, "-m", "rlcd", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self.lines = self.popen.stdout
            return
        self.popen = None
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read)
            _run_forked(argv, write)
        os.close(write)
        self.lines = open(read, encoding="utf-8", errors="replace")

    def wait(self) -> int:
        if self.popen is not None:
            return self.popen.wait()
        self.lines.close()
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])

    def stop(self) -> None:
        if self.popen is not None:
            self.popen.terminate()
        else:
            os.kill(self.pid, signal.SIGTERM)
        self.wait()


def _run_forked(argv: list[str], out: int) -> NoReturn:
    """In the forked child: `rlcd ARGV` as `python -m rlcd ARGV` would run it, output to `out`; never returns."""
    code = 1
    try:
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
        sys.argv = [str(Path(__file__).with_name("__main__.py")), *argv]  # what manifests record, as with `python -m rlcd`
        from rlcd.cli import main

        main(argv)
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001 - what the interpreter would print before exiting with 1
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # as at a normal exit (a tracker's run is closed, for one)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_pipeline(cfg: dict, where: str, run_dir: str | None, may_fork: bool = False) -> Path:
    check_config(cfg, where)
    run = Path(run_dir or cfg.get("run-dir") or "runs/rlcd")
    run.mkdir(parents=True, exist_ok=True)
    stages = plan(cfg, run)
    validate(stages, cfg, where)
    atomic_write_text(run / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    Runner(run, stages, may_fork).execute()
    return run


# --------------------------------------------------------------------------------------------------
# demo: the whole chain on the embedded default model, small enough for a laptop CPU
# --------------------------------------------------------------------------------------------------


def demo_config() -> dict:
    data = Path(__file__).parent / "data"
    return {
        "model": "smollm2",
        "task": "harmless",
        "seed": 0,
        "prompts-file": str(data / "harmless_prompts.jsonl"),
        "test-file": str(data / "demo_pairs.jsonl"),
        # chat prompts: the instruct model ends its turn with EOS (raw prompts rarely reach a new Human turn)
        "simulate": {"methods": ["rlcd"], "prompt-style": "chat", "max-prompts": 72, "max-new-tokens": 96, "max-attempts": 2,
                     "batch-size": 128, "engine": "fast"},
        "train-rm": {"epochs": 1, "batch-size": 8, "gradient-accumulation-steps": 1, "learning-rate": 3e-5, "eval-pairs": 0,
                     "group-by-length": True},
        "eval-rm": {"batch-size": 16, "num-pairs": 120},
        # 4 optimizer steps per PPO step at a LoRA learning rate; --compare-reference: a curve that shows learning at 8 rollouts a step;
        # --shared-value-head: one forward and backward of the policy serve both losses (PPO 162 s against 241 s, the same curve)
        "systems": {"base": {}, "rlcd-ppo": {"stage": "ppo", "reward-model": "rlcd", "lora": True, "steps": 5, "rollouts": 8,
                                              "minibatch-size": 4, "micro-batch-size": 4, "forward-batch-size": 4, "sort-by-length": True,
                                              "epochs": 2, "learning-rate": 3e-4, "max-new-tokens": 32, "accept-eos": True,
                                              "compare-reference": True, "shared-value-head": True, "save-every": 5}},
        "format-prompts": {"split": "all"},
        "generate": {"max-new-tokens": 48, "max-instances": 12},
        "compare": {"judge": "hf:smollm2", "against": "rlcd-ppo", "prompt-format": "harmless", "agreement-split": "all",
                    "agreement-pairs": 80},
    }


@dataclass
class PipelineConfig(Config):
    """`rlcd pipeline`: the whole study from one run file, resumable."""

    command: ClassVar[str] = "pipeline"
    config: str | None = option(None, "the run's YAML file (see configs/harmless.yaml)", required=True)
    run_dir: str | None = option(None, "where the run lives (default: the config's run-dir, else runs/rlcd)")


@dataclass
class DemoConfig(Config):
    """`rlcd demo`: the whole chain on the embedded default model on CPU, small."""

    command: ClassVar[str] = "demo"
    run_dir: str = option("runs/demo", "where the demo run lives")


CONFIGS = {"pipeline": PipelineConfig, "demo": DemoConfig}


def run(args: PipelineConfig | DemoConfig) -> None:
    started = time.time()
    may_fork = "torch" not in sys.modules  # else this process (a notebook, say) may have run torch operations already
    if args.command == "pipeline":
        cfg = load_config(args.config)
        run_dir = run_pipeline(cfg, args.config, args.run_dir, may_fork)
    else:
        run_dir = run_pipeline(demo_config(), "rlcd demo", args.run_dir, may_fork)
    print(f"finished in {time.time() - started:.0f} s; report: {run_dir / 'report' / 'report.html'}")
    print(run_dir / "report" / "report.html")
