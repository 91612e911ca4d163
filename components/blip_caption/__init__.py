"""Stage 5, BLIP caption."""
