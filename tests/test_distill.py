"""Teacher-guided finetuning on the tiny model: packed attention, the two loss terms, Trainer runs."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from refteacher.engine.errors import UserError

ROWS = [
    {"prompt": "What is 12 + 30?", "response": "12 + 30 = 42."},
    {"prompt": "Name a colour.", "response": "Blue."},
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there, how are you today?"}]},
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from refteacher.engine.modeling.loading import load_model, load_tokenizer

    return load_model(str(tiny_model_dir), device="cpu"), load_tokenizer(str(tiny_model_dir))


def _per_token_ce(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference per-token CE of one unpacked example through the model's ordinary forward."""
    logits = model(input_ids=ids[None]).logits[0, :-1]
    return F.cross_entropy(logits, labels[1:], reduction="none", ignore_index=-100)


@pytest.mark.parametrize("rows_per_batch", [1, 2])
def test_packed_rows_give_the_per_example_losses_of_single_runs(tiny, rows_per_batch):
    from refteacher.engine.data.chat_examples import encode_example
    from refteacher.engine.data.packing import collate_packed, pack_sequences
    from refteacher.engine.modeling.forward import final_hidden_states, lm_head_of

    model, tokenizer = tiny
    examples = [encode_example(tokenizer, row) for row in ROWS]
    lengths = sorted(len(ids) for ids, _ in examples)
    max_len = sum(lengths) if rows_per_batch == 1 else lengths[-1] + lengths[0]  # one row, or two rows
    rows = list(pack_sequences(examples, max_len))
    assert len(rows) >= rows_per_batch
    assert max(len(r.example_index) for r in rows) >= 2  # at least one row really packs examples
    batch = collate_packed(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = final_hidden_states(model, batch["input_ids"], batch["position_ids"])
        logits = hidden @ lm_head_of(model)[0].T
        for r, row in enumerate(rows):
            for k, example in enumerate(row.example_index):
                a, b = int(row.cu_seqlens[k]), int(row.cu_seqlens[k + 1])
                ids, labels = (torch.tensor(x) for x in examples[int(example)])
                packed = F.cross_entropy(logits[r, a:b - 1], batch["labels"][r, a + 1:b], reduction="none", ignore_index=-100)
                assert b - a == ids.shape[0]
                single = _per_token_ce(model, ids, labels)
                keep = batch["labels"][r, a + 1:b] != -100
                torch.testing.assert_close(packed[keep], single[keep], atol=2e-5, rtol=1e-5)


def test_task_cross_entropy_equals_the_model_loss(tiny):
    from refteacher.engine.data.chat_examples import encode_example
    from refteacher.engine.finetune.losses import task_cross_entropy

    model, tokenizer = tiny
    ids, labels = (torch.tensor([x]) for x in encode_example(tokenizer, ROWS[0]))
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(ids.shape[1])[None]}
    ours = task_cross_entropy(model, batch, chunk_size=3)  # several chunks
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours.detach(), expected, atol=1e-5, rtol=1e-5)


def test_alignment_kl_is_zero_against_itself_and_trains_only_lora(tiny, tiny_model_dir):
    from refteacher.engine.finetune.config import FinetuneConfig
    from refteacher.engine.finetune.dataset import PackedPairCollator, PairedRows, pack_records
    from refteacher.engine.finetune.losses import alignment_kl
    from refteacher.engine.finetune.trainer import add_lora
    from refteacher.engine.modeling.loading import load_model

    model, tokenizer = tiny
    teacher = load_model(str(tiny_model_dir), device="cpu")  # a separate copy: LoRA wraps `model` in place
    rows = list(pack_records(tokenizer, enumerate(ROWS, 1), 64))
    batch = PackedPairCollator(tokenizer.pad_token_id)(list(PairedRows(rows, rows)))
    student = add_lora(model, FinetuneConfig(data="-", out="-", baseline="sft", lora_r=4))
    try:
        kl = alignment_kl(student, teacher, batch)
        assert abs(float(kl.detach())) < 1e-6  # a fresh LoRA (B = 0) is the base model exactly
        with torch.no_grad():
            for name, p in student.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        for direction in ("forward", "reverse", "jsd"):
            kl = alignment_kl(student, teacher, batch, direction=direction, temperature=2.0)
            assert float(kl.detach()) > 1e-4
        kl.backward()
        grads = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert grads and all("lora_" in n for n in grads)
    finally:
        student.unload()  # give the shared fixture model back without adapters
        model.zero_grad(set_to_none=True)


def test_collator_pairs_task_and_alignment_rows(tiny):
    from refteacher.engine.finetune.dataset import PackedPairCollator, PairedRows, encoded_examples, pack_records

    _, tokenizer = tiny
    examples = list(encoded_examples(tokenizer, enumerate(ROWS, 1), 256))
    longest = max(len(ids) for ids, _ in examples)
    task = list(pack_records(tokenizer, enumerate(ROWS, 1), longest))  # the longest fills a row: two rows or more
    align = list(pack_records(tokenizer, enumerate(ROWS[:1], 1), 256))
    dataset = PairedRows(task, align)
    assert len(dataset) == len(task) and all(dataset[i]["align"] is align[0] for i in range(len(task)))
    # more alignment rows than task rows: an epoch still sees every one of them (task rows cycle)
    wide = PairedRows(task[:1], align * 3)
    assert len(wide) == 3 and [wide[i]["task"] for i in range(3)] == task[:1] * 3
    with pytest.raises(IndexError):
        wide[3]
    batch = PackedPairCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 2 and batch["align_input_ids"].shape[0] == 2
    assert "attention_mask" not in batch
    flat = PackedPairCollator(tokenizer.pad_token_id, varlen=True)([dataset[0], dataset[1]])
    assert flat["input_ids"].shape == (1, task[0].num_tokens + task[1].num_tokens)
    assert "align_input_ids" not in PackedPairCollator(0)([{"task": task[0], "align": None}])


def test_config_mistakes_are_user_errors(tmp_path, finetune_files):
    from refteacher.engine.finetune.config import FinetuneConfig
    from refteacher.engine.finetune.trainer import run_finetune

    task, align = finetune_files
    bad = [
        (FinetuneConfig(data=str(task), out=str(tmp_path), baseline="sft", teacher="t"),
         "--baseline sft trains without a teacher"),
        (FinetuneConfig(data=str(task), out=str(tmp_path)),  # no teacher
         "needs --teacher DIR"),
        (FinetuneConfig(data=str(task), out=str(tmp_path), teacher="t", align_helpful=1.5),
         "--align-helpful in \\[0, 1\\], got 192 and 1.5"),
        (FinetuneConfig(data=str(task), out=str(tmp_path), teacher="t", align_rows=0),
         "--align-rows must be >= 1"),
        (FinetuneConfig(data=str(task), out=str(tmp_path), baseline="sft", kl="sideways"),
         "--kl must be one of .*got 'sideways'"),
        (FinetuneConfig(data=str(task), out=str(tmp_path), baseline="sft", lam=-1),
         "--lambda must be >= 0, got -1"),
        (FinetuneConfig(data=str(task), out=str(tmp_path), baseline="sft", resume=True),  # nothing to resume
         "--resume: no checkpoint under"),
    ]
    for config, message in bad:
        with pytest.raises(UserError, match=message):
            run_finetune(config)


class _StopAt:
    """A TrainerCallback that stops training after ``step`` optimiser steps (a simulated crash)."""

    def __init__(self, step: int):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(inner, args, state, control, **kwargs):  # noqa: N805
                if state.global_step >= step:
                    control.should_training_stop = True
                return control

        self.callback = Stop()


def _adapter_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_finetune_trains_checkpoints_and_resumes_to_the_same_adapter(tmp_path, tiny_model_dir, tiny_teacher_dir, finetune_files):
    from refteacher.engine.finetune.config import FinetuneConfig
    from refteacher.engine.finetune.trainer import run_finetune

    task, align = finetune_files

    def config(out, **extra):
        return FinetuneConfig(data=str(task), align=str(align), teacher=str(tiny_teacher_dir), out=str(out),
                              max_steps=4, save_steps=2, logging_steps=1, max_len=96, lora_r=4,
                              learning_rate=5e-3, progress=False, **extra)

    straight = run_finetune(config(tmp_path / "straight"))
    assert straight["steps"] == 4 and straight["mode"] == "reft" and straight["attention"] == "block-mask"
    assert straight["final"]["kl"] > 0 and straight["final"]["ce"] > 0
    assert (tmp_path / "straight" / "checkpoints" / "checkpoint-2").is_dir()
    written = json.loads((tmp_path / "straight" / "finetune.json").read_text())
    assert written["teacher_manifest_sha256"] and written["n_align_rows"] == 3

    run_finetune(config(tmp_path / "resumed"), callbacks=[_StopAt(2).callback])
    with pytest.raises(UserError, match="--resume"):
        run_finetune(config(tmp_path / "resumed"))
    resumed = run_finetune(config(tmp_path / "resumed", resume=True))
    assert resumed["steps"] == 4 and resumed["resumed_from"].endswith("checkpoint-2")
    a, b = _adapter_weights(tmp_path / "straight"), _adapter_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    assert any(float(t.abs().max()) > 0 for n, t in a.items() if "lora_B" in n)  # it did train


def test_baseline_sft_runs_without_a_teacher(tmp_path, tiny_model_dir, finetune_files):
    from refteacher.engine.finetune.config import FinetuneConfig
    from refteacher.engine.finetune.trainer import run_finetune

    task, _ = finetune_files
    summary = run_finetune(FinetuneConfig(data=str(task), out=str(tmp_path / "sft"), student=str(tiny_model_dir),
                                          baseline="sft", max_steps=2, max_len=96, lora_r=4, progress=False,
                                          logging_steps=1, save_steps=100))
    assert summary["mode"] == "sft" and summary["teacher"] is None and "kl" not in summary["final"]
    from peft import PeftModel

    from refteacher.engine.modeling.loading import load_model

    PeftModel.from_pretrained(load_model(str(tiny_model_dir), device="cpu"), summary["adapter"])


def test_cli_parses_the_issue_flags():
    import argparse

    from refteacher.engine.finetune.command import add_finetune_cli

    parser = argparse.ArgumentParser()
    add_finetune_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "--student", "m", "--teacher", "t", "--data", "d", "--align", "a",
                              "--out", "o", "--lambda", "0.5", "--temperature", "2", "--kl", "jsd",
                              "--lora-r", "8", "--max-steps", "3", "--resume"])
    assert (args.lam, args.temperature, args.kl, args.lora_r, args.max_steps, args.resume) == (0.5, 2.0, "jsd", 8, 3, True)
    assert args.baseline is None and callable(args.func)


@pytest.fixture(scope="module")
def adapter_teacher_dir(tiny_model_dir, tmp_path_factory):
    """A teacher over the tiny model with a trained-looking LoRA adapter (random B) on layers 0-1."""
    from peft import LoraConfig, get_peft_model

    from refteacher.engine.modeling.loading import load_model
    from refteacher.engine.modeling.teacher_dir import save_teacher_dir

    torch.manual_seed(3)
    peft = get_peft_model(load_model(str(tiny_model_dir), device="cpu"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                                     layers_to_transform=[0, 1]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return save_teacher_dir(tmp_path_factory.mktemp("teachers") / "adapter_teacher", model_spec=str(tiny_model_dir),
                            model_hash="tiny", feature=torch.nn.functional.normalize(torch.randn(64), dim=0),
                            layer=2, threshold=0.1, adapter_model=peft)


def test_shared_base_teacher_computes_the_separate_teachers_kl(tiny_model_dir, adapter_teacher_dir):
    from refteacher.engine.finetune.config import FinetuneConfig
    from refteacher.engine.finetune.dataset import PackedPairCollator, PairedRows, pack_records
    from refteacher.engine.finetune.losses import alignment_kl, task_cross_entropy
    from refteacher.engine.finetune.shared_teacher import SharedBaseTeacher
    from refteacher.engine.finetune.trainer import add_lora
    from refteacher.engine.modeling.loading import load_model, load_tokenizer
    from refteacher.engine.modeling.teacher_dir import load_teacher

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = list(pack_records(tokenizer, enumerate(ROWS, 1), 64))
    batch = PackedPairCollator(tokenizer.pad_token_id)(list(PairedRows(rows, rows)))
    student = add_lora(load_model(str(tiny_model_dir), device="cpu"),
                       FinetuneConfig(data="-", out="-", baseline="sft", lora_r=4))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    ce_before = task_cross_entropy(student, batch).detach()
    shared = SharedBaseTeacher(student, adapter_teacher_dir / "adapter")
    separate = load_teacher(adapter_teacher_dir, device="cpu", merge_adapter=True).model
    for direction in ("forward", "jsd"):
        ours = alignment_kl(student, shared, batch, direction=direction)
        theirs = alignment_kl(student, separate, batch, direction=direction)
        assert float(theirs.detach()) > 1e-3  # the adapters differ: a real KL
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-7)
    ours.backward()
    # The student is untouched by the switch: same trainable weights, same loss, gradients only on them.
    assert [n for n, p in student.named_parameters() if p.requires_grad] == trainable
    assert all(p.grad is None for n, p in student.named_parameters() if ".teacher." in n)
    torch.testing.assert_close(task_cross_entropy(student, batch).detach(), ce_before)
    with pytest.raises(RuntimeError, match="no_grad"):
        shared(input_ids=batch["align_input_ids"])


def test_finetune_with_an_adapter_teacher_saves_only_the_student(tmp_path, adapter_teacher_dir, finetune_files):
    from refteacher.engine.finetune.config import FinetuneConfig
    from refteacher.engine.finetune.trainer import run_finetune

    task, align = finetune_files
    summary = run_finetune(FinetuneConfig(data=str(task), align=str(align), teacher=str(adapter_teacher_dir),
                                          out=str(tmp_path / "out"), max_steps=2, logging_steps=1, save_steps=100,
                                          max_len=96, lora_r=4, learning_rate=5e-3, progress=False))
    assert summary["teacher_weights"] == "shared with the student" and summary["final"]["kl"] > 0
    saved = _adapter_weights(tmp_path / "out")
    assert saved and not any("teacher" in name for name in saved)
    assert not (tmp_path / "out" / "adapter" / "teacher").exists()
