"""Datasets (tfds builders written as array_record, read without TensorFlow) and input pipelines."""
