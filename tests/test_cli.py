"""The `gradual` command's small subcommands: score, prune, eval, and their bad-input handling."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from gradual import importance
from gradual.cli import main
from gradual.models import load_model
from gradual.surgery import remove_layers


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> list[list[str]]:
    """Rows of `format_table`: rank, layer, original, score."""
    return [line.split() for line in out.splitlines() if re.match(r"^\s*\d+\s+\d+\s+\d+\s+\S+$", line)]


def test_score_prints_every_layer_ranked(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["score", "--model", "tiny:llama:6", "--metric", "block_influence", "--num-calibration", "4"],
                       capsys)
    assert code == 0
    rows = table_rows(out)
    assert len(rows) == 6
    assert sorted(int(r[1]) for r in rows) == list(range(6))
    scores = [float(r[-1]) for r in rows]
    assert scores == sorted(scores), "least important first"


def test_prune_saves_a_model_equal_to_in_memory_surgery(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pruned"
    code, stdout, _ = run(["prune", "--model", "tiny:gemma3:6", "--layers", "1,4", "--out", str(out)], capsys)
    assert code == 0 and "removed original layers [1, 4]" in stdout
    saved, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())
    reference = load_model("tiny:gemma3:6")
    remove_layers(reference, [1, 4])
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(saved(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert saved.config.layer_types == reference.config.layer_types


@pytest.mark.parametrize(("argv", "needle"), [
    (["prune", "--model", "tiny:llama:4", "--layers", "7"], "layer index 7 is out of range"),
    (["prune", "--model", "tiny:llama:4", "--layers", "1,1"], "given more than once"),
    (["prune", "--model", "tiny:llama:4", "--layers", "0,1,2,3"], "would leave none"),
    (["prune", "--model", "tiny:llama:4", "--layers", "x"], "--layers 'x' is invalid"),
    (["prune", "--model", "tiny:bert", "--layers", "1"], "'bert'"),
    (["score", "--model", "tiny:llama:4", "--metric", "magic"], "--metric 'magic'"),
    (["score", "--model", "tiny:llama:4", "--calibration", "/nonexistent.txt"], "/nonexistent.txt"),
    (["eval", "--model", "tiny:llama:4", "--tasks", "poetry"], "'poetry'"),
    (["eval", "--model", "tiny:llama:4", "--tasks", "successor", "--fmt", "essay"], "'essay'"),
    (["eval", "--model", "tiny:llama:4", "--tasks", "humaneval"], "--enable-code"),
    (["bogus"], "unknown command 'bogus'"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], needle: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    if argv[0] == "prune":
        argv = [*argv, "--out", str(tmp_path / "out")]
    code, _, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_of_a_local_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import BertConfig

    folder = tmp_path / "bert"
    BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64).save_pretrained(
        folder)
    code, _, err = run(["prune", "--model", str(folder), "--layers", "0", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "unsupported architecture 'bert'" in err and "llama" in err


def test_eval_prints_both_forms(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["eval", "--model", "tiny:llama:4", "--tasks", "successor", "--n", "4",
                        "--max-new-tokens", "4"], capsys)
    assert code == 0
    keys = [r[0] for r in (line.strip("|").split("|") for line in out.splitlines()[2:])]
    assert [k.strip() for k in keys] == ["successor", "mc_successor"]


@pytest.mark.slow
def test_smollm2_scores_all_30_layers_from_one_calibration_pass() -> None:
    from gradual.models import load_tokenizer

    model = load_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    batches = importance.calibration_batches(tokenizer, importance.calibration_texts(None, n=16), batch_size=8,
                                             max_length=64)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        scores = importance.score_layers(model, batches, "block_influence", progress=False)
    finally:
        handle.remove()
    assert len(calls) == len(batches) == 2
    assert len(scores.scores) == 30 and all(0 <= s <= 2 for s in scores.scores)
    assert scores.scores[0] == max(scores.scores), "layer 0 is the most important on SmolLM2 (RESEARCH.md)"


def test_tasks_lists_every_task_by_family_with_its_baseline_and_an_example(
        capsys: pytest.CaptureFixture[str]) -> None:
    from gradual.tasks import TASKS
    from gradual.tasks.families import FAMILIES

    assert main(["tasks", "--difficulty", "large"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["family", "task", "forms", "answer"] and "example (large)" in out[0]
    assert "SmolLM2-135M few-shot (small)" in out[0]
    rows = [line.split()[:2] for line in out[1:]]
    assert rows == [[family, task] for family, tasks in FAMILIES.items() for task in tasks]
    assert sorted(task for _, task in rows) == sorted([*TASKS, "humaneval"])
    successor = next(line for line in out if line.split()[1] == "successor")
    assert "0.71 ± 0.05 (floor 0.01, n=100)" in successor and "'What number comes after" in successor
    reversal = next(line for line in out if line.split()[1] == "word_sequence_reversal")
    assert reversal.split()[0] == "strings_lists" and "(floor 0.02, n=64)" in reversal
    assert main(["tasks", "--difficulty", "huge"]) == 2
    assert "difficulty='huge' is unknown" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "needle"), [
    (["compare"], "gradual compare: the following arguments are required: --config"),
    (["eval", "--model", "tiny:llama", "--n", "x"], "gradual eval: argument --n: invalid int value: 'x'"),
    (["score", "--model", "tiny:llama", "--bogus"], "gradual score: unrecognized arguments: --bogus"),
])
def test_argparse_rejections_are_one_line_exit_2(argv: list[str], needle: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gradual: error: {needle}"]


# ----------------------------------------------------------------------------------------------------------------
# One parser per command (jsonargparse from a typed function): help, --config / --print_config, one-line errors
# ----------------------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {  # every command's option names, kept stable (users type them), plus --config and --print_config
    "score": ["--model", "--metric", "--span", "--calibration", "--num-calibration", "--batch-size", "--max-length",
              "--dtype", "--seed", "--trust-remote-code"],
    "eval": ["--model", "--tasks", "--forms", "--fmt", "--n", "--batch-size", "--max-new-tokens", "--seed",
             "--difficulty", "--enable-code", "--lm-eval-tasks", "--include-path", "--limit", "--dtype",
             "--trust-remote-code"],
    "prune": ["--model", "--out", "--layers", "--num", "--metric", "--protect-first", "--protect-last", "--dtype",
              "--trust-remote-code"],
    "tasks": ["--difficulty"],
    "compare": ["--depths", "--arms", "--out", "--overwrite"],
}


def help_entries(text: str) -> dict[str, str]:
    """The options section of a `--help`: each option's first spelling → its description (without the trailing
    `(type: ..., default: ...)` that jsonargparse adds)."""
    section = text.split("\noptions:\n", 1)[1]
    entries: list[list[str]] = []
    for line in section.splitlines():
        if re.match(r"^  -", line):
            entries.append([line])
        elif entries and line.startswith(" " * 4):
            entries[-1].append(line)
    described = {}
    for lines in entries:
        invocation, _, first = lines[0].strip().partition("  ")
        words = " ".join([first, *lines[1:]]).split()
        description = re.sub(r"\((required, )?type: .*\)$", "", " ".join(words)).strip()
        described[invocation.split()[0].rstrip(",")] = description
    return described


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_help_has_a_sentence_for_every_option(command: str, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert main([command, "--help"]) == 0
    entries = help_entries(capsys.readouterr().out)
    assert set(OPTIONS[command]) | {"-h", "--config", "--print_config"} <= set(entries)
    for option, description in entries.items():
        assert len(description.split()) >= 3 and description[0].isupper(), (option, description)


PRINTED = {  # argv whose --print_config must read back through --config to the same options
    "score": ["--model", "tiny:llama:4", "--metric", "reverse", "--num-calibration", "4", "--trust-remote-code"],
    "eval": ["--model", "tiny:llama:4", "--tasks", "successor,copy", "--n", "4", "--max-new-tokens", "3",
             "--lm-eval-tasks", "[arc_easy, piqa]", "--enable-code"],
    "prune": ["--model", "tiny:llama:4", "--out", "pruned", "--layers", "1,2", "--protect-last", "2"],
    "tasks": ["--difficulty", "large"],
    "compare": ["--config", str(ROOT / "configs" / "compare.yaml"), "--depths", "4", "--arms", "paper,no_recovery",
                "--overwrite"],
}


def print_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main([*argv, "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("command", sorted(PRINTED))
def test_print_config_reads_back_through_config(command: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    printed = print_config([command, *PRINTED[command]], capsys)
    saved = tmp_path / "printed.yaml"
    saved.write_text(yaml.safe_dump(printed))
    assert print_config([command, "--config", str(saved)], capsys) == printed
    given = dict(zip(PRINTED[command][::2], PRINTED[command][1::2], strict=False))
    if command == "score":
        assert printed["num_calibration"] == 4 and printed["trust_remote_code"] is True
    if command == "eval":
        assert printed["tasks"] == "successor,copy" and printed["lm_eval_tasks"] == ["arc_easy", "piqa"]
        assert printed["enable_code"] is True and printed["max_new_tokens"] == 3
    if command == "prune":
        assert printed["layers"] == "1,2" and printed["protect_last"] == 2
    if command == "tasks":
        assert printed == {"difficulty": "large"}
    if command == "compare":
        from gradual.compare import load_plan

        assert printed["compare"]["budget_per_layer"] == 12 and printed["overwrite"] is True
        direct, read_back = load_plan(PRINTED[command]), load_plan(["--config", str(saved)])
        assert read_back == direct and [a.name for a in direct.arms] == given["--arms"].split(",")
        assert direct.depths == [4] and direct.base == {k: v for k, v in yaml.safe_load(
            (ROOT / "configs" / "compare.yaml").read_text()).items() if k != "compare"}


def test_config_file_and_options_mix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Options after --config override it; its keys are the parameter names (underscores)."""
    config = tmp_path / "score.yaml"
    config.write_text("model: tiny:llama:6\nnum_calibration: 4\nmetric: reverse\n")
    code, out, _ = run(["score", "--config", str(config), "--metric", "block_influence"], capsys)
    assert code == 0 and len(table_rows(out)) == 6
    assert print_config(["score", "--config", str(config), "--metric", "block_influence"], capsys)["metric"] \
        == "block_influence"


BAD_OPTIONS = [
    (["score"], "gradual score: the following arguments are required: --model"),
    (["score", "--model", "m", "--num-calibration", "x"], "gradual score: argument --num-calibration: invalid int "
                                                          "value: 'x'"),
    (["score", "--model", "m", "--config", "/nonexistent.yaml"], "gradual score: argument --config: File does not "
                                                                 "exist: '/nonexistent.yaml'"),
    (["score", "--config", "{bad}.yaml"], "gradual score: unknown option 'bogus'; allowed: model, metric, span"),
    (["eval", "--model", "m", "--max-new-tokens", "x"], "gradual eval: argument --max-new-tokens: 'x' is invalid; "
                                                        "allowed: int or null"),
    (["eval", "--model", "m", "--tasks", "successor", "--enable-code=false"], "argument --enable-code: ignored "
                                                                              "explicit argument 'false'"),
    (["prune", "--model", "m", "--out", "{tmp}/o"], "gradual prune: one of the arguments --layers --num is required"),
    (["prune", "--model", "m", "--out", "{tmp}/o", "--num", "1", "--layers", "1"],
     "gradual prune: argument --num: not allowed with argument --layers"),
    (["prune", "--model", "m", "--out", "{tmp}/o", "--num", "many"], "gradual prune: argument --num: 'many' is "
                                                                     "invalid; allowed: int or null"),
    (["prune", "--model", "m", "--out", "{tmp}/o", "--num", "1", "--metric", "task_ablation"],
     "--metric 'task_ablation' is not available here"),
    (["tasks", "--difficulty"], "gradual tasks: argument --difficulty: expected one argument"),
    (["tasks", "--bogus"], "gradual tasks: unrecognized arguments: --bogus"),
    (["compare", "--config", "{bad}.yaml"], "gradual compare: unknown option 'bogus'; allowed: depths, arms, out"),
    (["compare", "--config", str(ROOT / "configs" / "compare.yaml"), "--overwrite", "--depths", "[4, x]"],
     "depths='[4, x]' is invalid"),
]


@pytest.mark.parametrize(("argv", "needle"), BAD_OPTIONS)
def test_rejected_options_are_one_line_exit_2_before_any_model_loads(argv: list[str], needle: str, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the options were checked")

    for name in ("load_model", "load_tokenizer", "model_depth", "original_layers"):
        monkeypatch.setattr(f"gradual.models.{name}", no_model)
    (tmp_path / "bad.yaml").write_text("model: m\nbogus: 1\n")
    argv = [a.replace("{bad}", str(tmp_path / "bad")).replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradual: error: ") and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_importing_the_cli_changes_nothing_outside_it() -> None:
    """No module-level side effects: importing the commands sets no environment variable, leaves sys.argv and
    matplotlib's backend alone, and `gradual.compare` does not import the CLI back (no import cycle)."""
    code = ("import os, sys, matplotlib\n"
            "def use(*args, **kwargs): raise AssertionError('matplotlib.use() at import')\n"
            "matplotlib.use = use\n"
            "os.environ.pop('TOKENIZERS_PARALLELISM', None); argv = list(sys.argv)\n"
            "import gradual.compare, gradual.compare.outputs, gradual.run_report\n"
            "assert 'gradual.cli' not in sys.modules, 'gradual.compare imports the CLI'\n"
            "import gradual.cli\n"
            "assert 'TOKENIZERS_PARALLELISM' not in os.environ and sys.argv == argv\n")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
