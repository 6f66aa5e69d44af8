"""Detection: stored hidden states and their features, extraction, the LSI probe, calibration, the layer sweep."""
