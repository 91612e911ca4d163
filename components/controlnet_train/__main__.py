"""Stage 8, ControlNet training: `python -m components.controlnet_train --config-json ... --input encoded=URI --output URI`."""
import sys

from cnpipe.cli import main
from components.controlnet_train.stage import run

sys.exit(main("controlnet_train", run))
