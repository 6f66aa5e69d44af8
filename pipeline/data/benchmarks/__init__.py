"""Public benchmark files: readers of their formats, loaders to one example schema, and comparison suites."""
