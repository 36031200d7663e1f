"""Training: losses, sampling, faults, the loop, and ``train(config)``."""
