import sys

from cnpipe.cli import main
from components.laion_retrieval.stage import run

sys.exit(main("laion_retrieval", run))
