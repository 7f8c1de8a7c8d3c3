"""TPU implementations (Pallas splash attention)."""
