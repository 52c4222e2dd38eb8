"""Ray jobs that turn a URL list into a retrieval database (download, embed, index, aesthetic, neighbours)."""

import os

# img2dataset imports albumentations, which otherwise checks PyPI for updates at import time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
