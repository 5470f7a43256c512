"""The teacher's data: splits stay apart, calibration harmful prompts are rephrased in every form,
and harmful prompts can be drawn category-balanced."""
from __future__ import annotations

import random

import pytest

from refteacher.engine.data.prompt_sets import PromptRecord
from refteacher.engine.errors import UserError
from refteacher.engine.teacher.config import TeacherConfig
from refteacher.engine.teacher.training import StepBatches, balanced_sample, category_groups, train_teacher
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


def test_every_training_prompt_carries_its_category_rephrasings_included():
    harmful = [PromptRecord(p, "harmful", "t", category="theft" if i % 4 else "hate") for i, p in enumerate(HARMFUL)]
    _, harmless = _records()
    data = build_teacher_data(harmful, harmless, rephrase_per_prompt=2, template_harmless=0, ce_harmless=4)
    assert len(data.train_harmful_categories) == len(data.train_harmful)
    category_of = {r.prompt: r.category for r in harmful}
    originals = [(p, c) for p, c in zip(data.train_harmful, data.train_harmful_categories) if p in category_of]
    assert originals and all(category_of[p] == c for p, c in originals)
    rephrased = data.train_harmful_categories[len(originals):]
    assert len(rephrased) == 2 * len(originals)
    assert rephrased == [c for _, c in originals for _ in range(2)]


# ----------------------------------------------------------------------------- category-balanced sampling


def test_balanced_sample_takes_each_group_equally_whatever_its_size():
    groups = [list(range(90)), list(range(90, 99)), [99]]
    for seed in range(20):
        chosen = balanced_sample(random.Random(seed), groups, 7)
        assert len(chosen) == len(set(chosen)) == 7
        per_group = [sum(i in set(g) for i in chosen) for g in groups]
        # the one-prompt group runs dry after one round; the other two share the rest evenly
        assert per_group == [3, 3, 1]


def test_balanced_sample_edges():
    rng = random.Random(0)
    assert balanced_sample(rng, [], 5) == []
    assert balanced_sample(rng, [[], [3]], 5) == [3]
    assert sorted(balanced_sample(rng, [[0, 1], [2]], 10)) == [0, 1, 2]  # more asked than held: all of them
    assert balanced_sample(rng, [[0, 1], [2]], 0) == []
    assert balanced_sample(random.Random(5), [[0, 1, 2], [3, 4]], 3) == balanced_sample(random.Random(5),
                                                                                         [[0, 1, 2], [3, 4]], 3)


def test_category_groups_keep_first_seen_order_and_none_as_a_group():
    assert category_groups(["a", None, "b", "a", None]) == [[0, 3], [1, 4], [2]]
    assert category_groups([]) == []


def test_step_batches_draw_harmful_prompts_and_refusals_by_category_when_grouped():
    # 95 prompts of one category, 5 of another: uniform draws rarely meet the small one, balanced ones
    # take half of every batch from it.
    categories = ["big"] * 95 + ["small"] * 5
    harmful_ids = [[i] for i in range(100)]
    refusals = [([i], [i]) for i in range(100)]  # one refusal per harmful prompt, in the same order
    kwargs = {"feature_batch": 4, "ce_batch": 4, "seed": 0, "length": 50}

    def small_share(groups):
        batches = StepBatches(harmful_ids, [[1000]] * 10, refusals, [([2000], [2000])] * 10, harmful_groups=groups,
                              **kwargs)
        items = [batches[m] for m in range(len(batches))]
        prompts = [ids[0] for item in items for ids in item["prompt_ids"][:item["n_harmful"]]]
        chosen_refusals = [ids[0] for item in items for ids, _ in item["ce_examples"] if ids[0] < 100]
        return (sum(p >= 95 for p in prompts) / len(prompts), sum(r >= 95 for r in chosen_refusals) / len(chosen_refusals))

    assert small_share(category_groups(categories)) == (0.5, 0.5)
    uniform = small_share(None)
    assert uniform[0] < 0.2 and uniform[1] < 0.2


def test_unknown_harmful_sampling_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--harmful-sampling must be one of prompt, category"):
        train_teacher("unused", [], [], tmp_path / "t", TeacherConfig(harmful_sampling="bycategory"))
