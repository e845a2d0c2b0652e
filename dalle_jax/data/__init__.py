"""Datasets (tfds builders written as array_record, read without TensorFlow) and the input pipeline."""
