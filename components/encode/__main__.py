"""Stage 7, encode: `python -m components.encode --config-json ... --input conditioning=<uri>/<type> --output <uri>`."""
import sys

from cnpipe.cli import main
from components.encode.stage import run

sys.exit(main("encode", run))
