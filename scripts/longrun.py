"""What the long-run scripts (paper_library.py, paper_eval.py, layer_routing.py, dp_price.py) share: git as the
store of long work, and the checks of their task data and device.

Each commits every finished piece at once, so a fresh clone resumes from what main holds; several may run side
by side, and a person may have other changes staged, so a commit names its own paths only (`git commit --only`).
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path


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


def data_and_device(parser, args):
    """The torch device of `args.device`, after checking `args.data` names the task directory (one-line errors)."""
    from seqr.hf.models import device_of

    if not args.data or not Path(args.data).is_dir():
        parser.error(f"--data / $SEQR_TASK_DATA must name the task directory, got {args.data!r}")
    try:
        return device_of(args.device)
    except ValueError as e:
        parser.error(str(e))
