"""Git facts and operations (GitPython). Nothing here ever discards uncommitted work."""

from pathlib import Path

import git

EDITABLE = "inference.py"


def open_repo(root):
    """The git repository at `root`, or None when `root` is not inside one. Replace refs are
    ignored: `git replace --graft` would rewrite what a commit descends from."""
    try:
        repo = git.Repo(root, search_parent_directories=False)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    repo.git.update_environment(GIT_NO_REPLACE_OBJECTS="1")
    return repo


def state(root):
    """Where the working tree stands: commit, subject, branch, and whether inference.py is dirty."""
    repo = open_repo(root)
    if repo is None or not repo.head.is_valid():
        return {"commit": "none", "subject": "", "branch": "", "dirty": True}
    head = repo.head.commit
    branch = "" if repo.head.is_detached else repo.active_branch.name
    dirty = bool(repo.git.status("--porcelain", "--", EDITABLE).strip())
    return {"commit": head.hexsha[:7], "subject": head.summary, "branch": branch, "dirty": dirty}


def ancestry(root, commit="HEAD"):
    """Short hashes of `commit` and all its ancestors (HEAD's: the current branch's history),
    newest first. Walked from the commit objects themselves, so neither replace refs nor a
    grafts file (`.git/info/grafts`, which `git rev-list` honours) can hide a parent."""
    repo = open_repo(root)
    if repo is None or not repo.head.is_valid():
        return []
    start = repo.commit(commit)
    seen, order, todo = {start.hexsha}, [], [start]
    while todo:
        todo.sort(key=lambda c: c.committed_date)
        current = todo.pop()
        order.append(current.hexsha[:7])
        for parent in current.parents:
            if parent.hexsha not in seen:
                seen.add(parent.hexsha)
                todo.append(parent)
    return order


def file_at(root, commit, path):
    """The text of `path` at `commit`."""
    repo = open_repo(root)
    return repo.git.show(f"{commit}:{Path(path).as_posix()}")


def changed_locked_files(root, base_commit):
    """Tracked files (other than inference.py) that differ from `base_commit`, committed or not."""
    repo = open_repo(root)
    names = repo.git.diff("--name-only", base_commit, "--").splitlines()
    return sorted(n for n in names if n and n != EDITABLE)


def is_clean(root):
    """True when no tracked file has uncommitted changes (untracked files don't count:
    a hard reset leaves them alone)."""
    repo = open_repo(root)
    return repo is not None and not repo.is_dirty(index=True, working_tree=True, untracked_files=False)


def reset_hard(root, commit):
    """Move the current branch to `commit` (only called on a clean tree)."""
    open_repo(root).git.reset("--hard", commit)
