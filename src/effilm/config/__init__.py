"""Configs: plain dataclasses of serialisable fields (data configs live in ``effilm.config.data``)."""
