"""Per-frame metrics, evaluation of predicted sequences, and plots."""
