"""Stage 9, evaluate: `python -m components.evaluate --config-json ... --input trained=<train output uri>
--input conditioning=<conditioning output uri> --output <uri>`."""
import sys

from cnpipe.cli import main
from components.evaluate.stage import run

if __name__ == "__main__":
    sys.exit(main("evaluate", run))
