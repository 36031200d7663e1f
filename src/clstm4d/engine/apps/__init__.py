"""The commands that compose the other subpackages: demo, plan, evaluate, synth."""
