"""Stage 3, LAION retrieval: more image URLs by CLIP similarity, from a clip-retrieval kNN service."""
