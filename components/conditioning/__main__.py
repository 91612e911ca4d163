import os
import sys

# MediaPipe logs through glog/absl to stderr for every graph; keep warnings and above only.
os.environ.setdefault("GLOG_minloglevel", "2")

from cnpipe.cli import main
from components.conditioning.stage import run

if __name__ == "__main__":
    sys.exit(main("conditioning", run))
