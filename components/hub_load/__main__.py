import sys

from cnpipe.cli import main
from components.hub_load.stage import run

sys.exit(main("hub_load", run))
