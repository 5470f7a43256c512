"""The teacher as the student's own base weights with the teacher's LoRA adapter switched in.

A ReFT teacher is the provider's aligned model plus a small LoRA adapter, and by default the student
is a fresh LoRA on that same model. Loading the teacher as a second model keeps a second copy of
every base weight (135M fp32: 0.54 GB; an 8B model in bf16: 16 GB per GPU), although both sides
read the same frozen matrices. ``SharedBaseTeacher`` loads only the teacher's adapter, next to the
student's, into the student's peft model, and runs the teacher's forward with the teacher's adapter
active and the student's off. The adapter is not merged, so the teacher computes
``W x + s * B (A x)`` instead of ``(W + s * B A) x``: equal up to float rounding (closer in bf16,
where the merged weight rounds most of the low-rank update away).

Only the teacher's forward under ``torch.no_grad`` switches adapters, and it switches back before
returning, so the student's backward (also a gradient-checkpointing recompute) sees the student's
adapter. Switching writes each LoRA layer's active-adapter list directly: peft's ``set_adapter``
would also flip ``requires_grad`` of every adapter, under an optimizer that is already built.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from refteacher.engine.errors import UserError

TEACHER_ADAPTER = "teacher"


class SharedBaseTeacher:
    """Callable like the teacher model (``final_hidden_states`` and ``lm_head_of`` accept it).

    ``peft_model`` is the student (a PeftModel with its trainable adapter active); ``adapter_dir``
    the teacher's peft adapter folder, or None for a teacher that is the bare base model.
    """

    def __init__(self, peft_model, adapter_dir: str | Path | None):
        self.peft_model = peft_model
        self.adapter = None
        if adapter_dir is not None:
            trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
            peft_model.load_adapter(str(adapter_dir), adapter_name=TEACHER_ADAPTER, is_trainable=False)
            now = {n for n, p in peft_model.named_parameters() if p.requires_grad}
            if now != trainable:
                raise UserError(f"loading the teacher adapter from {adapter_dir} changed which weights train")
            self.adapter = TEACHER_ADAPTER

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within the block the model computes the teacher: its adapter alone on, in eval mode."""
        layers = [m for m in self.peft_model.modules() if isinstance(m, BaseTunerLayer)]
        saved = [m._active_adapter for m in layers]
        was_training = self.peft_model.training
        try:
            for layer in layers:
                layer._active_adapter = [self.adapter] if self.adapter else []
            self.peft_model.eval()
            yield
        finally:
            for layer, names in zip(layers, saved):
                layer._active_adapter = names
            self.peft_model.train(was_training)

    def __call__(self, **kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError("the shared-base teacher runs under torch.no_grad() only")
        with self.active():
            return self.peft_model(**kwargs)

    # What final_hidden_states / lm_head_of / the vocabulary check read from a model.
    def get_decoder(self):
        return self.peft_model.get_base_model().get_decoder()

    def get_output_embeddings(self):
        return self.peft_model.get_output_embeddings()

    @property
    def config(self):
        return self.peft_model.config

    def parameters(self):
        return self.peft_model.parameters()
