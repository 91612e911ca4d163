import sys

from cnpipe.cli import main
from components.blip_caption.stage import run

if __name__ == "__main__":
    sys.exit(main("blip_caption", run))
