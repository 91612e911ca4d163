"""The orchestration: what runs the pipeline rather than a stage (the local runner and its embedded web, each
task's Kubernetes settings, submitting to a Kubeflow host). It sits above components/, which sit above the
library in cnpipe/; imports run only downwards (tests/core/test_layers.py)."""
