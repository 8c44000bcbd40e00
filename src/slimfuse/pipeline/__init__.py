"""Pipelines on top of the techniques: the demo and its reports."""
