"""curate: every row less the rejected ones (per-row filters, duplicates), plus clip_similarity."""
import sys

from cnpipe.cli import main
from components.curate.stage import run

if __name__ == "__main__":
    sys.exit(main("curate", run))
