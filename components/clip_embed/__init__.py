"""Stage 2, CLIP embed: L2-normalised CLIP image embeddings for every seed image."""
