"""Every setting is checked once, where it is defined: one dtype check for every dtype setting, one check of the
built-in task settings for `gradual eval`, `TaskEvaluation` and `evaluate`, the selection's fields when it is built,
and the evaluation callbacks' numbers in their constructors (so Python users get the same refusals as the CLI)."""

from __future__ import annotations

import pytest

from gradual.callbacks import LmEvalEvaluation, TaskEvaluation
from gradual.distill import Recovery
from gradual.errors import UsageError
from gradual.models import check_dtype, check_quantize
from gradual.stages import Selection
from gradual.tasks import check_task_settings


def test_one_dtype_check_names_the_setting_as_written() -> None:
    assert check_dtype("bfloat16") == "bfloat16" and check_dtype(None, "data.dtype", nullable=True) is None
    with pytest.raises(UsageError, match=r"^--dtype 'fp8' is unknown; allowed: float32, bfloat16, float16, auto$"):
        check_dtype("fp8", "--dtype")
    with pytest.raises(UsageError, match=r"^data\.dtype='fp8' is unknown; allowed: .*, auto or null$"):
        check_dtype("fp8", "data.dtype", nullable=True)
    with pytest.raises(UsageError, match=r"^model\.dtype=None is unknown"):
        check_dtype(None, "model.dtype")
    with pytest.raises(UsageError, match=r"^recovery\.teacher_dtype='fp8' is unknown; allowed: .* or null$"):
        Recovery(teacher_dtype="fp8")
    with pytest.raises(UsageError, match=r"^recovery\.teacher_quantize='int4' is unknown; allowed: nf4 or null$"):
        Recovery(teacher_quantize="int4")
    assert check_quantize(None) is None and check_quantize("nf4") == "nf4"


def test_one_task_settings_check_names_options_or_keys() -> None:
    check_task_settings(["successor", "humaneval"], ["classification"], "chat", enable_code=True, difficulty="large")
    check_task_settings([], [], "fewshot")  # no tasks: the forms do not matter
    refusals = [
        (dict(tasks=["poetry"]), "unknown task(s) 'poetry'", "unknown task(s) 'poetry'"),
        (dict(tasks=["humaneval"]), "set enable_code=True to allow it", "add --enable-code to allow it"),
        (dict(tasks=["copy"], forms=["multiple"]), "forms=['multiple'] is invalid", "--forms 'multiple' is invalid"),
        (dict(tasks=["copy"], forms=[]), "forms=[] is invalid", "--forms '' is invalid"),
        (dict(tasks=["copy"], fmt="essay"), "fmt='essay' is unknown", "--fmt 'essay' is unknown"),
        (dict(tasks=["copy"], difficulty="huge"), "difficulty='huge' is unknown", "difficulty='huge' is unknown"),
    ]
    for kwargs, as_key, as_option in refusals:
        for options, needle in ((False, as_key), (True, as_option)):
            with pytest.raises(UsageError) as err:
                check_task_settings(**{"forms": ["generative"], **kwargs}, options=options)
            assert needle in str(err.value), (kwargs, options, str(err.value))


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(tasks=[]), "TaskEvaluation.tasks is empty"),
    (dict(tasks=["copy"], forms=[]), "forms=[] is invalid"),
    (dict(tasks=["copy"], fmt="json"), "fmt='json' is unknown"),
    (dict(tasks=["copy"], batch_size=0), "TaskEvaluation batch_size=0 is invalid"),
    (dict(tasks=["copy"], max_new_tokens=0), "TaskEvaluation max_new_tokens=0 is invalid"),
])
def test_task_evaluation_refuses_its_settings_when_built(kwargs: dict, needle: str) -> None:
    with pytest.raises(UsageError) as err:
        TaskEvaluation(**kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(tasks=[]), "LmEvalEvaluation.tasks is empty"),
    (dict(tasks=["t"], batch_size=0), "LmEvalEvaluation batch_size=0 is invalid"),
    (dict(tasks=["t"], limit=0), "LmEvalEvaluation limit=0 is invalid"),
    (dict(tasks=["t"], num_fewshot=-1), "LmEvalEvaluation num_fewshot=-1 is invalid"),
])
def test_lm_eval_evaluation_refuses_its_settings_when_built(kwargs: dict, needle: str) -> None:
    with pytest.raises(UsageError) as err:
        LmEvalEvaluation(**kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(metric="task_ablation"), "selection.tasks=None: metric 'task_ablation' scores built-in generative tasks"),
    (dict(metric="task_ablation", tasks=[]), "selection.tasks=[]: metric 'task_ablation'"),
    (dict(tasks=["copy"]), "selection.tasks=['copy'] is used only by metric 'task_ablation', not 'block_influence'"),
    (dict(metric="task_ablation", tasks=["humaneval"]), "unknown task(s) 'humaneval'; allowed: successor, copy"),
    (dict(metric="task_ablation", tasks=["copy"], n=0), "selection.n=0 is invalid"),
    (dict(metric="task_ablation", tasks=["copy"], fmt="oneshot"), "selection.fmt='oneshot' is unknown; allowed: "
     "fewshot, chat"),
    (dict(metric="task_ablation", tasks=["copy"], task_score="em"), "selection.task_score='em' is unknown; allowed: "
     "loglik, accuracy"),
    (dict(difficulty="medium"), "selection.difficulty='medium' is unknown; allowed: small, large"),
    (dict(rescore="no"), "selection.rescore='no' is invalid; allowed: true, false"),
])
def test_a_selection_refuses_task_ablation_and_ranking_settings_when_built(kwargs: dict, needle: str) -> None:
    with pytest.raises(UsageError) as err:
        Selection(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_selection_checks_its_fields_when_built_and_the_depth_when_asked() -> None:
    for kwargs, needle in ((dict(span=0), "selection.span=0"), (dict(protect_last=-1), "protect_last must be >= 0"),
                           (dict(metric="magic"), "selection.metric='magic'")):
        with pytest.raises(UsageError, match=needle):
            Selection(**kwargs)
    selection = Selection(metric="angular_distance", span=3, protect_first=1, protect_last=1)
    selection.validate(4, [1, 1])
    with pytest.raises(UsageError, match="selection.span=3 is invalid: a stage scores a model of 2 layers"):
        selection.validate(4, [1, 1, 1])
