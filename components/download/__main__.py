import os
import sys

# img2dataset imports albumentations, whose import phones home for updates unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from components.download import url_guard

# Fails closed from the start: until stage.run installs the configured policy, every fetch here is refused;
# img2dataset's worker processes install theirs as they start (img2dataset_pool).
url_guard.install_from_env()

if __name__ == "__main__":
    from cnpipe.cli import main
    from components.download.stage import run

    sys.exit(main("download", run))
