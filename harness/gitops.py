"""Git facts and operations (GitPython). Nothing here ever discards uncommitted work."""

import os
from pathlib import Path

import git

EDITABLE = "inference.py"


def open_repo(root):
    """The git repository at `root`, or None when `root` is not inside one. Replace refs and
    a grafts file are ignored: either would rewrite what a commit descends from."""
    try:
        repo = git.Repo(root, search_parent_directories=False)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    repo.git.update_environment(GIT_NO_REPLACE_OBJECTS="1", GIT_GRAFT_FILE=os.devnull)
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


def resolve(repo, commit):
    """The full hash of the one commit whose hash starts with `commit` (a short hash from the
    ledger), or None when there is none or several. Looked up among the objects, never the
    refs: a branch named like a short hash would shadow the commit (a red team's branch
    `7bb6dcf` pointing at HEAD made the locked-file check compare HEAD with itself)."""
    if commit == "HEAD":
        return repo.head.commit.hexsha
    try:
        found = repo.git.rev_parse(f"--disambiguate={commit}").split()
    except git.GitCommandError:
        return None
    commits = [h for h in found if repo.git.cat_file("-t", h) == "commit"]
    return commits[0] if len(commits) == 1 else None


def ancestry(root, commit="HEAD"):
    """Short hashes of `commit` and all its ancestors (HEAD's: the current branch's history),
    newest first. Walked from the commit objects themselves, so neither replace refs nor a
    grafts file (`.git/info/grafts`, which `git rev-list` honours) can hide a parent."""
    repo = open_repo(root)
    if repo is None or not repo.head.is_valid() or resolve(repo, commit) is None:
        return []
    start = repo.commit(resolve(repo, commit))
    seen, order, todo = {start.hexsha}, [], [start]
    while todo:
        todo.sort(key=lambda c: c.committed_date)
        current = todo.pop()
        order.append(current.hexsha[:7])
        for parent in current.parents:
            if parent.hexsha not in seen and _present(parent):
                seen.add(parent.hexsha)
                todo.append(parent)
    return order


def _present(commit):
    """Whether `commit`'s object is in the repository (a shallow clone's history stops short)."""
    try:
        return commit.committed_date is not None
    except ValueError:
        return False


def file_at(root, commit, path):
    """The text of `path` at `commit` ('' when the commit cannot be told apart: resolve)."""
    repo = open_repo(root)
    full = resolve(repo, commit)
    return repo.git.show(f"{full}:{Path(path).as_posix()}") if full else ""


def changed_locked_files(root, base_commit):
    """Tracked files (other than inference.py) that differ from `base_commit`, committed or not."""
    repo = open_repo(root)
    full = resolve(repo, base_commit)
    if full is None:
        return [f"(no single commit {base_commit}: several share that short hash, or none)"]
    names = repo.git.diff("--name-only", full, "--").splitlines()
    return sorted(n for n in names if n and n != EDITABLE)


def is_clean(root):
    """True when no tracked file has uncommitted changes (untracked files don't count:
    a hard reset leaves them alone)."""
    repo = open_repo(root)
    return repo is not None and not repo.is_dirty(index=True, working_tree=True, untracked_files=False)


def reset_hard(root, commit):
    """Move the current branch to `commit` (only called on a clean tree)."""
    repo = open_repo(root)
    repo.git.reset("--hard", resolve(repo, commit) or commit)
