import os
import sys

# MediaPipe logs through glog/absl to stderr for every graph; keep warnings and above only.
os.environ.setdefault("GLOG_minloglevel", "2")

from cnpipe.cli import main
from cnpipe.native_noise import native_stderr_without
from components.conditioning.stage import run

if __name__ == "__main__":
    with native_stderr_without():  # what absl and TFLite still print per pose graph, and nobody can act on
        code = main("conditioning", run)
    sys.exit(code)
