"""Prediction: sliding windows over space, chunks over time, and the Predictor."""
