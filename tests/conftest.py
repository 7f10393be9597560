"""Session-wide test settings: caches that runs may share (teacher outputs) go to a temporary folder."""

import os
import tempfile

os.environ.setdefault("ZOO_CACHE_DIR", tempfile.mkdtemp(prefix="zoo-cache-"))
