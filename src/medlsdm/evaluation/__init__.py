"""Metrics, feature extractors, segmentation test, privacy audit and reports."""
