"""Where the paper tasks' original files are: $TAILORED_JAX_SHARED_DATA, else the `shared/data`
folder beside the repository (CI lays it there)."""

import os

DATA = os.environ.get("TAILORED_JAX_SHARED_DATA") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"
)
