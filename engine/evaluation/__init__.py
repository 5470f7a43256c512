"""Evaluation: harmful score, share of harmless prompts answered, task accuracy, filter metrics."""
