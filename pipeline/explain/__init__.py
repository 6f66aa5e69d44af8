"""Explanations: integrated-gradients attribution of a score to tokens and image regions, and its figures."""
