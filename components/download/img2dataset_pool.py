"""img2dataset's Downloader in worker processes that start with the stage and serve all of its batches.

img2dataset.download() would, on every call, import img2dataset in the calling process (1-3 s), spawn a
logger process and a pool whose workers import it again, then tear it all down. The part this stage needs
is its Downloader (fetch with retries, robots directives, resize, encode, write Parquet), which img2dataset's
own distributors ship to their processes or executors; here it runs in a spawned pool that starts importing
while the stage still reads its first shards, so that the stage's process never imports img2dataset and
the next batch downloads while the last one is committed.
"""
from __future__ import annotations

import glob
import io
import json
import os
import shutil
import tempfile
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

# img2dataset's output columns that the stage reads back (plus the image column, named by the encode format)
OUTPUT_COLUMNS = ["row_key", "status", "error_message", "width", "height"]


class Fetched:
    """img2dataset's output rows, by our row key: the small columns as Python values, the images left in Arrow
    (never one Python bytes object per image: a shard's images are copied once, into the shard we write), and
    the conversions our fetch layer made, by row key."""

    def __init__(self, table: pa.Table | None, encode_format: str, conversions: dict[str, dict] | None = None):
        self.images = table.column(encode_format) if table is not None else pa.chunked_array([], pa.binary())
        columns = {name: table.column(name).to_pylist() if table is not None else [] for name in OUTPUT_COLUMNS}
        self.position = {key: i for i, key in enumerate(columns["row_key"])}
        self.status, self.error, self.width, self.height = (columns[n] for n in ("status", "error_message", "width", "height"))
        self.conversions = conversions or {}

    @classmethod
    def read(cls, folder: str, encode_format: str) -> "Fetched":
        """The Parquet files img2dataset's writer left in `folder`, and our workers' conversion files, as one Fetched."""
        parts = [pq.ParquetFile(path).read(columns=OUTPUT_COLUMNS + [encode_format]) for path in sorted(glob.glob(f"{folder}/*.parquet"))]
        conversions = {}
        for path in glob.glob(f"{folder}/*{CONVERSIONS_SUFFIX}"):
            with open(path) as file:
                conversions.update(json.load(file))
        return cls(pa.concat_tables(parts) if parts else None, encode_format, conversions)


CONVERSIONS_SUFFIX = ".conversions.json"  # beside a task's Parquet: {row key: {note: count}}


def downloader_settings(cfg) -> dict:
    """What every worker needs from the download config, as plain values (pickled to the workers once per task)."""
    return {name: getattr(cfg, name) for name in (
        "image_size", "resize_mode", "min_image_size", "max_aspect_ratio", "max_image_area", "timeout_s", "retries",
        "thread_count", "encode_format", "encode_quality", "user_agent_token", "disallowed_header_directives")}


# ---------------------------------------------------------------- in the workers

def _start_worker() -> None:
    """Each worker guards urllib (the policy comes in CNPIPE_URL_POLICY; without it every task fails) and imports
    img2dataset at once, while the stage's process is still reading its inputs."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else albumentations' import phones home
    from PIL import Image

    from components.download import url_guard

    policy = url_guard.install_from_env()
    Image.MAX_IMAGE_PIXELS = None  # the guard's header check against download.max_image_area decides, not Pillow's default
    if policy is not None:  # OpenCV's own limit too (read as cv2 loads), for whatever it decodes that Pillow read otherwise
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(policy.max_image_area)
    import img2dataset.downloader  # noqa: F401


def _ready() -> None:
    """A no-op task: submitting one per worker makes the pool spawn them all now."""


def _download_share(settings: dict, url_file: str, share: int, share_rows: int, out_folder: str) -> None:
    """img2dataset's Downloader on one Arrow file of (row_key, url): its Parquet output goes to `out_folder`.
    The arguments are img2dataset.download's, with everything this stage does not use turned off."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter

    from components.download import url_guard

    policy = url_guard.require_policy()  # never download unguarded: the stage fails with GuardMissing's message instead
    url_guard.take_conversions()  # nothing of an earlier task
    resizer = Resizer(
        image_size=settings["image_size"], resize_mode=settings["resize_mode"], resize_only_if_bigger=True,
        upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=settings["encode_quality"],
        encode_format=settings["encode_format"], skip_reencode=False, disable_all_reencoding=False,
        min_image_size=settings["min_image_size"], max_image_area=settings["max_image_area"],
        max_aspect_ratio=settings["max_aspect_ratio"],
        blurrer=None,
    )
    downloader = Downloader(
        sample_writer_class=ParquetSampleWriter, resizer=NamedDecodeFailures(resizer, policy.max_image_area),
        thread_count=settings["thread_count"],
        save_caption=False, extract_exif=False, output_folder=out_folder, column_list=["row_key", "url"],
        timeout=settings["timeout_s"], number_sample_per_shard=share_rows, oom_shard_count=5, compute_hash=None,
        verify_hash_type=None, encode_format=settings["encode_format"], retries=settings["retries"],
        user_agent_token=settings["user_agent_token"],
        disallowed_header_directives=list(settings["disallowed_header_directives"]) or None, blurring_bbox_col=None,
    )
    with pa.memory_map(url_file) as source:  # img2dataset removes it once done
        rows = pa.ipc.open_file(source).read_all().to_pydict()
    downloader.download_shard((share, url_file))  # raises instead of img2dataset's print-and-return-False
    converted = url_guard.take_conversions()
    if converted:
        by_key = {key: converted[url] for key, url in zip(rows["row_key"], rows["url"]) if url in converted}
        with open(os.path.join(out_folder, f"{share}{CONVERSIONS_SUFFIX}"), "w") as file:
            json.dump(by_key, file)


class NamedDecodeFailures:
    """img2dataset's Resizer, where OpenCV cannot decode what passed the header check (img2dataset says only
    "Image decoding error"): decode_rgb's reason instead (truncated_image, corrupt_image, ... as hub_load names
    them), or, where Pillow decodes it after all, the resize of its lossless PNG (hub_load would keep it too)."""

    def __init__(self, resizer, max_area: int):
        self.resizer = resizer
        self.max_area = max_area

    def __call__(self, img_stream, blurring_bbox_list=None):
        result = self.resizer(img_stream, blurring_bbox_list)
        if result[-1] != "Image decoding error":
            return result
        from cnpipe import images
        from components.download import faithful, url_guard

        img_stream.seek(0)
        try:
            png = faithful.lossless_png(images.decode_rgb(img_stream.read(), 1, self.max_area))
        except images.ImageRejected as err:
            return None, None, None, None, None, str(url_guard.FetchFailed(err.reason, err.detail))
        return self.resizer(io.BytesIO(png), blurring_bbox_list)


# ---------------------------------------------------------------- in the stage's process

class Img2datasetPool:
    """`processes_count` spawned workers, kept for the whole stage; `submit` splits URLs into their tasks."""

    def __init__(self, cfg):
        self.settings = downloader_settings(cfg)
        self.processes = max(1, cfg.processes_count)
        # spawn, as img2dataset does: forking a process that holds pyarrow's and OpenCV's threads is unsafe
        self._executor = ProcessPoolExecutor(self.processes, mp_context=get_context("spawn"), initializer=_start_worker)
        for _ in range(self.processes):
            self._executor.submit(_ready)

    def __enter__(self) -> "Img2datasetPool":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            # No more tasks come: the workers finish those queued and exit while the stage commits the last ones.
            self._executor.shutdown(wait=False)
            return
        # After an error nothing they fetch would be committed: stop them now rather than let the interpreter's
        # exit wait for a task of thousands of URLs. (ProcessPoolExecutor.terminate_workers from Python 3.14.)
        if hasattr(self._executor, "terminate_workers"):
            self._executor.terminate_workers()
            return
        workers = list((self._executor._processes or {}).values())  # shutdown forgets them
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in workers:
            process.terminate()

    def submit(self, groups: list[list[tuple[str, str]]], share_rows: int) -> list[Callable[[], Fetched]]:
        """Start downloading groups of (row key, url) pairs (a shard's each) in tasks of at most `share_rows`;
        returns, per group, the call that waits for that group's tasks and reads what they fetched."""
        return [self._submit_group(urls, share_rows) for urls in groups]

    def _submit_group(self, urls: list[tuple[str, str]], share_rows: int) -> Callable[[], Fetched]:
        folder = tempfile.mkdtemp(prefix="cnpipe-dl-")
        out_folder = os.path.join(folder, "out")
        os.mkdir(out_folder)
        futures: list[Future] = []
        for share, start in enumerate(range(0, len(urls), share_rows)):
            chunk = urls[start:start + share_rows]
            url_file = os.path.join(folder, f"{share}.arrow")
            table = pa.table({"row_key": [k for k, _ in chunk], "url": [u for _, u in chunk]})
            with pa.OSFile(url_file, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            futures.append(self._executor.submit(_download_share, self.settings, url_file, share, share_rows, out_folder))

        def finish() -> Fetched:
            try:
                for future in futures:
                    future.result()  # a worker's exception comes back here, with its traceback
                return Fetched.read(out_folder, self.settings["encode_format"])
            except BrokenProcessPool:
                raise RuntimeError("an img2dataset worker process died (out of memory?); committed shards are kept, "
                                   "rerun to resume") from None
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        return finish
