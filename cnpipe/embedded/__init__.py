"""Everything the embedded default needs that would otherwise come from the network:
seed images, a pool of web images for the loopback LAION stand-in, and tiny models."""
