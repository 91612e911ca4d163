import sys

from cnpipe.cli import main
from components.report.stage import run

if __name__ == "__main__":
    sys.exit(main("report", run))
