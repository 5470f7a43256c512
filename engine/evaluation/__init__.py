"""Evaluation: harmful score, task accuracy, filter metrics, and the refusal judge."""
