"""Evaluation: generation in batches with per-sample seeds, the one quality sweep (CLI and demo), quality metrics
per sampling point, likelihood of data sets, diagnostics against exact flow maps, plots."""
