"""The `gradual` command's small subcommands: score, prune, eval, and their bad-input handling."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
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


def test_tasks_lists_every_builtin_task_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    from gradual.tasks import TASKS

    assert main(["tasks", "--difficulty", "large"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["task", "forms", "answer"] and "example (large)" in out[0]
    assert [line.split()[0] for line in out[1:]] == [*TASKS, "humaneval"]
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
