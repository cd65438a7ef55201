"""Evaluation: retrieval metrics (retrieval.py)."""
