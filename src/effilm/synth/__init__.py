"""Synthetic textbook data: the procedural generator, teacher-model backends and the run driver.

Submodules are imported on use; ``import effilm.synth`` loads nothing heavy.
"""
