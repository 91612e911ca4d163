"""Orbax checkpoints of the whole train state plus a JSON record of what it belongs to.

Item "state": params, optimizer state, EMA, step, RNG key, first non-finite step (arrays, saved
asynchronously while training goes on). Item "meta": the data position, the model fingerprint
and the data fingerprint. Orbax publishes a step only once all of it is written, so a run killed
mid-save resumes from the previous complete step. Refusing a checkpoint of another model happens
before any array is read.
"""
from __future__ import annotations

import os

from components.controlnet_train.model import fingerprint_differences


class ResumeError(RuntimeError):
    """The output folder holds checkpoints this run must not continue from."""


def follow_storage_emulator() -> None:
    """gcsfs and google-cloud-storage honour STORAGE_EMULATOR_HOST; orbax writes gs:// through tensorstore,
    which reads its own variables, so point those at the same emulator (which accepts any token)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "storage-emulator")


def _directory(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


_ONE_REPLICA_REGISTERED = False


def _save_from_one_replica(ocp) -> None:
    """Off TPU, each replicated array is written from one device, as orbax already does on GPU.

    orbax's replica-parallel save (its default elsewhere) cuts every replicated array into one slice
    per device and dispatches a device op per slice: with hundreds of small arrays on CPU devices
    that costs seconds per save (6 s for the tests' model on 4 CPU devices) and gains nothing.
    orbax keeps its type handlers in a process-wide registry, so this is set once per process.
    """
    import jax

    global _ONE_REPLICA_REGISTERED
    if _ONE_REPLICA_REGISTERED or jax.default_backend() == "tpu":
        return
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    _ONE_REPLICA_REGISTERED = True


class Checkpoints:
    def __init__(self, uri: str, keep: int):
        follow_storage_emulator()
        import orbax.checkpoint as ocp

        self.ocp = ocp
        _save_from_one_replica(ocp)
        self.directory = _directory(uri)
        options = ocp.CheckpointManagerOptions(max_to_keep=max(keep, 1), create=True, enable_async_checkpointing=True)
        # OCDBT (one database per checkpoint, the default) commits through conditional writes that a GCS
        # emulator does not implement; against one, each array is its own zarr folder instead.
        handlers = {"state": ocp.StandardCheckpointHandler(use_ocdbt=not os.environ.get("STORAGE_EMULATOR_HOST")),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int) -> str:
        return f"{self.directory}/{step}"

    def save(self, step: int, state, meta: dict) -> None:
        args = self.ocp.args
        self.manager.save(step, args=args.Composite(state=args.StandardSave(state), meta=args.JsonSave(meta)), force=True)

    def read_meta(self, step: int) -> dict:
        args = self.ocp.args
        return self.manager.restore(step, args=args.Composite(meta=args.JsonRestore()))["meta"]

    def check_compatible(self, step: int, model_fingerprint: dict) -> dict:
        """The checkpoint's meta, after checking it was made for this very model."""
        meta = self.read_meta(step)
        differences = fingerprint_differences(meta["fingerprint"], model_fingerprint)
        if differences:
            raise ResumeError(
                f"{self.path(step)} was written for another model configuration; refusing to resume. "
                f"Differences: {'; '.join(differences)}. Use a new output folder or restore the old settings."
            )
        return meta

    def restore(self, step: int, like):
        """The saved state, placed with the shardings of `like` (a state of the same structure): a checkpoint
        written replicated or sharded, on any device count, resumes in this run's layout (orbax reads each
        device's slice of the global arrays)."""
        import jax

        abstract = jax.tree.map(self.ocp.utils.to_shape_dtype_struct, like)
        args = self.ocp.args
        return self.manager.restore(step, args=args.Composite(state=args.StandardRestore(abstract)))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
