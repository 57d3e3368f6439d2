"""Inference: the generation engine, the decode step and sampling."""
