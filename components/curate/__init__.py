"""Curate: duplicates and weak image-caption pairs out, across the whole dataset, before conditioning.

Three steps, each its own kfp task family (pipeline.py wires them when curate.enabled):
  curate_keys   per shard, in shard groups (vision): decode once; pixel hash, pHash at several crops, the CLIP image
                embedding (reused from clip_embed for seed rows, computed with its code for downloaded ones), the
                caption's CLIP similarity, and the per-row filters' verdicts -> <run>/curate/keys (no image bytes)
  curate_dedup  one task (vision, faiss): reads only those compact keys, in priority order keeps one row per group
                of duplicates, writes which rows are dropped and for which kept row -> <run>/curate/dedup
  curate        per shard, in shard groups (core): the images less every rejected row, plus clip_similarity
                -> <run>/curate, the dataset conditioning reads
"""
