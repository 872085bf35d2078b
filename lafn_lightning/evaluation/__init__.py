"""Scoring edits: metrics (torchmetrics), predictions, the evaluation protocol, reports, analysis."""
