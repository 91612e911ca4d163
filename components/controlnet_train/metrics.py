"""Training metrics: one line per log step to stdout and to `metrics.jsonl` (via cnpipe.storage).

The file is rewritten whole at each log step (atomic on every backend, gs:// included); it holds
only log-step records, so it stays small. On resume, records past the restored step are dropped:
those steps are trained again and logged again. wandb and TensorBoard are optional mirrors,
imported only when the config turns them on.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

from cnpipe import storage


class MetricsLog:
    def __init__(self, output_uri: str, primary: bool, resume_step: int, wandb_project: str = "",
                 tensorboard: bool = False, run_config: dict | None = None):
        self.uri = storage.join(output_uri, "metrics.jsonl")
        self.primary = primary
        self.records: list[dict] = []
        self.sinks: list = []
        if not primary:
            return
        if storage.exists(self.uri):
            lines = storage.read_bytes(self.uri).decode().splitlines()
            self.records = [r for r in map(json.loads, filter(None, lines)) if r.get("step", 0) <= resume_step]
        if wandb_project:
            self.sinks.append(_WandbSink(wandb_project, run_config or {}))
        if tensorboard:
            self.sinks.append(_TensorBoardSink(storage.join(output_uri, "tensorboard")))

    def write(self, record: dict) -> None:
        if not self.primary:
            return
        self.records.append(record)
        print(_readable(record), file=sys.stdout, flush=True)
        storage.write_bytes_atomic(self.uri, "".join(json.dumps(r) + "\n" for r in self.records).encode())
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _readable(record: dict) -> str:
    parts = [f"[controlnet_train] step {record['step']}"]
    for key, fmt in (("loss", ".5f"), ("grad_norm", ".4f"), ("lr", ".3e"), ("step_time_s", ".4f"), ("images_per_s", ".1f")):
        if key in record:
            parts.append(f"{key} {record[key]:{fmt}}")
    return "  ".join(parts)


class _WandbSink:
    def __init__(self, project: str, config: dict):
        try:
            import wandb
        except ImportError as err:
            raise RuntimeError("train.wandb_project is set but the wandb package is not installed") from err
        self.run = wandb.init(project=project, config=config)

    def write(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class _TensorBoardSink:
    """Event files are written locally and copied to the output (which may be an object store) on close."""

    def __init__(self, uri: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise RuntimeError("train.tensorboard is on but the tensorboard package is not installed") from err
        self.uri = uri
        self.local = tempfile.mkdtemp(prefix="tensorboard-")
        self.writer = SummaryWriter(self.local)

    def write(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self.writer.close()
        for name in os.listdir(self.local):
            with open(os.path.join(self.local, name), "rb") as f:
                storage.write_bytes_atomic(storage.join(self.uri, name), f.read())
