"""Evaluation per size: retrieval and classification metrics, the image and the text evaluations."""
