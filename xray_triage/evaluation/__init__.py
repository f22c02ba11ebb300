"""Evaluating models on labelled image sets: metrics and the `models evaluate` command."""
