"""The guard as a product: command line and local web demo."""
