"""Planning before training: fingerprint, topology, memory model, planner."""
