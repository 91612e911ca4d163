"""Shared library of the ControlNet pipeline: storage, the shard format, image decoding, stage plumbing.

Every stage imports only from here and from its own component folder, so the same code runs
under kfp's local runner, in a family image on Kubeflow, and in plain unit tests.
"""
