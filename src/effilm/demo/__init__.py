"""The end-to-end demo: config, stages, training, shipping, notes and report."""
