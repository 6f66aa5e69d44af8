"""Model adapters: one small interface in front of every supported model."""
