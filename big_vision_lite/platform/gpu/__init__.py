"""GPU implementations (cuDNN attention) and settings."""
