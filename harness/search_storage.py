"""Where a study lives: the Optuna RDB storage (SQLite by default, PostgreSQL shared by
several machines), the study's name, opening or joining it, and the trials that count.

Imports search_space only (see its docstring for the order of the search modules).
"""

import os
import random
import re
import time
from pathlib import Path

from harness.search_space import SearchError, make_sampler, optuna_module
from harness.settings import ROOT, digest

DB_NAME = "search.db"
HEARTBEAT_S = 30            # a process's trials beat this often ...
GRACE_S = 120               # ... and one silent this long (killed) is marked FAIL


def one_line(text, limit=300):
    """The first non-blank line of `text` (an exception's message), cut to `limit` characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else type(text).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def default_storage(root=ROOT):
    """The SQLite file in the repository (git-ignored via *.db)."""
    return f"sqlite:///{Path(root) / DB_NAME}"


def shown_url(url):
    """`url` with any password hidden, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _engine_options(url):
    """(url, engine kwargs) for `url`; SearchError when it is not a database URL."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        raise SearchError(f"--storage {url!r} is not a database URL: use sqlite:///path/to/search.db "
                          f"or postgresql://user:password@host:5432/dbname") from None
    backend = parsed.get_backend_name()
    kwargs = {}
    if parsed.drivername == "postgresql":
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; we ship psycopg2-binary
        url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    if backend == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 10}  # fail in seconds, not minutes
    elif backend == "sqlite":
        kwargs["connect_args"] = {"timeout": 60}  # wait for another local process's write
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().parent
            if not folder.is_dir():
                raise SearchError(f"cannot open the study storage {url}: folder {folder} does not exist")
    return url, kwargs


def open_storage(url):
    """An Optuna RDB storage for `url` (sqlite:///..., postgresql://...). Raises SearchError."""
    optuna = optuna_module()
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    url, kwargs = _engine_options(url)
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S)
        except (IntegrityError, ProgrammingError) as exc:
            # Processes started together on an empty database race to create Optuna's
            # tables; the loser sees "duplicate key" / "already exists". Try again.
            if attempt == 4:
                raise SearchError(f"cannot open the study storage {shown_url(url)}: {one_line(exc)}") from None
            time.sleep(0.5 + random.random())
        except Exception as exc:  # sqlalchemy and the drivers raise many types
            raise SearchError(f"cannot open the study storage {shown_url(url)}: {one_line(exc)}") from None


def default_study_name(protocol, inference_sha, search_section):
    """search-<protocol>-<inference.py hash>-<space hash>: one study per protocol, pipeline
    version and search space (Optuna refuses to change a knob's choices inside a study).

    `search_section` is harness.yaml's `search:` mapping as written (settings.as_dict()).
    """
    return f"search-{protocol}-{inference_sha[:8]}-{digest(search_section)[:6]}"


def open_study(storage, name, sampler_seed, startup_trials, attrs):
    """Create the study (returns (study, True)) or load it ((study, False)).

    A loaded study must have been made for the same protocol and inference.py;
    otherwise SearchError. The creator uses `sampler_seed` as given; a process joining
    an existing study adds its pid, so parallel processes do not replay one another.
    """
    optuna = optuna_module()
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                    sampler=make_sampler(sampler_seed, startup_trials))
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=make_sampler(sampler_seed + os.getpid(), startup_trials))
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise SearchError(f"study {name} minimizes: it was not made by this harness; pass --study NEW")
    for key in ("protocol", "inference_sha256"):
        have = study.user_attrs.get(key)
        if have is not None and have != attrs[key]:
            raise SearchError(f"study {name} was made for another {key.replace('_sha256', '.py')} "
                              f"({have[:12]}, here {attrs[key][:12]}): pass --study NEW for a new study")
    return study, False


def counted_trials(study):
    """Trials that count toward --trials: finished or running, warm-started ones aside.

    FAIL trials (interrupted, a harness error, surplus) do not count: they are redone.
    """
    optuna = optuna_module()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
              optuna.trial.TrialState.RUNNING)
    return [t for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get("warm_start")]
