"""The teacher's data: splits stay apart, calibration harmful prompts are rephrased in every form."""
from __future__ import annotations

import pytest

from refteacher.engine.data.prompt_sets import PromptRecord
from refteacher.engine.errors import UserError
from refteacher.engine.teacher.training_data import build_teacher_data

HARMFUL = [f"Explain how to steal car number {i} without being caught" for i in range(40)]
HARMLESS = [f"Explain how to wash car number {i} without scratching it" for i in range(40)]


def _records():
    return ([PromptRecord(p, "harmful", "t") for p in HARMFUL], [PromptRecord(p, "benign", "t") for p in HARMLESS])


def test_calibration_is_disjoint_from_training_and_rephrased_in_every_form():
    harmful, harmless = _records()
    one = build_teacher_data(harmful, harmless, calib_fraction=0.25, rephrase_per_prompt=1, template_harmless=40,
                             ce_harmless=8, calib_rephrase=1)
    five = build_teacher_data(harmful, harmless, calib_fraction=0.25, rephrase_per_prompt=1, template_harmless=40,
                              ce_harmless=8, calib_rephrase=5)
    originals = [p for p in five.calib_harmful if p in HARMFUL]
    assert originals and not set(originals) & set(five.train_harmful)
    assert len(five.calib_harmful) == 6 * len(originals)
    assert len(one.calib_harmful) == 2 * len(originals)
    assert set(one.calib_harmful) < set(five.calib_harmful)
    assert not set(five.calib_harmless) & set(five.train_harmless)
    assert set(five.ce_harmless) <= set(five.train_harmless)


def test_empty_class_is_a_user_error():
    harmful, _ = _records()
    with pytest.raises(UserError, match="the teacher needs both harmful and harmless prompts"):
        build_teacher_data(harmful, [])
