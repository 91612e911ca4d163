"""Stage 9, evaluate: generate from held-out controls with the trained ControlNet; CLIP score, control fidelity, FD."""
