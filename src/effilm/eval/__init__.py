"""Evaluation: task formats, scoring, reports and decontamination."""
