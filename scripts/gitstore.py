"""git as the store of long work: commit exactly the files a finished piece wrote, and nothing else.

Long builds and evaluations (scripts/paper_library.py, paper_eval.py, layer_routing.py) commit each finished piece
at once, so a fresh clone resumes from what main holds; several may run side by side, and a person may have
other changes staged, so a commit names its own paths only (`git commit --only`).
"""
from __future__ import annotations

import subprocess
import time


def commit_only(paths, message: str, tries: int = 5) -> None:
    """Commit these files (a path or a list; folders too) and nothing else staged beside them; retried while
    another git command holds the index. Nothing changed: no commit."""
    paths = [str(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    for attempt in range(tries):
        added = subprocess.run(["git", "add", "--", *paths])
        if added.returncode == 0:
            if not subprocess.run(["git", "diff", "--cached", "--quiet", "--", *paths]).returncode:
                return  # unchanged since the last commit
            if subprocess.run(["git", "commit", "-q", "--only", "-m", message, "--", *paths]).returncode == 0:
                return
        time.sleep(2 + 3 * attempt)
    raise RuntimeError(f"could not commit {paths} after {tries} tries")
