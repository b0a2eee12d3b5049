"""Evaluation: the stages (oplora.evaluation.stage), found by package scan, and the evaluation of one cell (cell.py)."""

from oplora.registry import discover

discover(__name__, __path__)
