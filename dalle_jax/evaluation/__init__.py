"""Evaluation of images against captions (`shapes_judge`: the deterministic shapes judge)."""
