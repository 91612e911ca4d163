import sys

from cnpipe.cli import main
from components.clip_embed.stage import run

sys.exit(main("clip_embed", run))
