"""Teacher-guided finetuning: LoRA on the kept user data with task CE + KL to the teacher."""
