"""Requests and where they come from: request sources, images, the training-data builder, benchmark files."""
