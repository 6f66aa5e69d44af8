"""Evaluation: baselines, detection metrics in-source and held out, the defence comparison, judges, plots, report."""
