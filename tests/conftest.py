"""Shared fixtures: tiny random-weight models, and a real git copy of the project to run prepare.py in."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Skip the cold g++ compile of fused kernels in every process the tests start.
os.environ["MLX_DISABLE_COMPILE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import tiny_model_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROJECT_FILES = ["prepare.py", "inference.py", "harness.yaml", "harness", "requirements.txt",
                 "requirements-dev.txt", ".gitignore"]


def require_bwrap():
    """Fail in CI, skip elsewhere, where bubblewrap cannot start."""
    from harness import sandbox

    prefix, why = sandbox._bwrap_prefix()
    if prefix is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs a working bubblewrap: {why}")
        pytest.skip(why)


@pytest.fixture
def sandboxed(monkeypatch):
    """Workers run under bubblewrap here: required in CI, skipped where it cannot start."""
    from harness import sandbox

    monkeypatch.delenv(sandbox.ENV_VAR, raising=False)
    require_bwrap()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory, "qwen2")


def git(cwd, *args):
    """Run git in `cwd` and return its stdout (raises on failure)."""
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


class Project:
    """A throwaway copy of the project in its own git repository, for end-to-end runs."""

    def __init__(self, root, model_dir):
        self.root = Path(root)
        self.model_dir = Path(model_dir)

    @property
    def inference(self):
        return self.root / "inference.py"

    def settings(self):
        return yaml.safe_load((self.root / "harness.yaml").read_text())

    def write_settings(self, settings):
        (self.root / "harness.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))

    def edit_inference(self, old, new):
        text = self.inference.read_text()
        assert old in text, f"{old!r} not in inference.py"
        self.inference.write_text(text.replace(old, new, 1))

    def commit(self, message):
        git(self.root, "add", "-A")
        git(self.root, "commit", "-qm", message)
        return git(self.root, "rev-parse", "--short=7", "HEAD")

    def run(self, *args, timeout=600):
        """Run `python prepare.py ARGS` here; returns the CompletedProcess."""
        return subprocess.run([sys.executable, "prepare.py", *args], cwd=self.root,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def evaluate(self, *args):
        """Run a quick evaluation on the tiny model with --json; returns (process, result dict)."""
        proc = self.run("--quick", "--json", "--model", str(self.model_dir), *args)
        lines = proc.stdout.strip().splitlines()
        result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
        return proc, result

    def evaluate_model(self, model_dir, *args):
        """evaluate() on another model folder."""
        proc = self.run("--quick", "--json", "--model", str(model_dir), *args)
        lines = proc.stdout.strip().splitlines()
        return proc, json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None

    def ledger_lines(self):
        path = self.root / "results.tsv"
        return path.read_text().splitlines() if path.exists() else []


def make_project(root, model_dir, *, call_s=60, max_tokens=8, repeats=3, warmup=1, max_repeats=12, budget_s=60):
    """Copy the project into `root`, shrink the quick workload for speed (and let it decide:
    up to `max_repeats` rounds of A/B), commit it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    project = Project(root, model_dir)
    settings = project.settings()
    settings["timeouts"]["call_s"] = call_s
    quick = settings["workload"]["presets"]["quick"]
    quick.update(max_tokens=max_tokens, repeats=repeats, warmup=warmup, max_repeats=max(max_repeats, repeats),
                 budget_s=budget_s)
    for prompt in settings["workload"]["prompts"]:
        if prompt["kind"] == "prefill":
            prompt["document_tokens"] = 128
    # A random-weight model passes no task: judge it only relative to its reference.
    settings["quality"]["gates"]["sanity_floor"] = 0.0
    project.write_settings(settings)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "Test")
    project.commit("baseline")
    return project


@pytest.fixture
def project(tmp_path, tiny_llama):
    """A fresh project copy in a real git repo, running the tiny llama model."""
    return make_project(tmp_path / "project", tiny_llama)
