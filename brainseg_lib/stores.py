"""Early checks of the stores a run talks to by URL: the MLflow tracking store
(``tracking_uri``) and a sweep's Optuna database (``brainseg sweep --storage``).

Each is checked before any data loads, within seconds (MLflow's own client retries an
unreachable server for minutes), and a bad one is one line naming the URL with its password
masked: a URL that does not parse, a scheme or dialect nobody knows, a driver that is not
installed, a server or database that does not answer.
"""

from __future__ import annotations

import functools
import importlib.util
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from brainseg_lib.errors import BrainsegError

TIMEOUT_S = 3.0  # a server that has not answered by then is reported, not waited for
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433,
                 "oracle": 1521}
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQL stores
TRACKING_SCHEMES = ("http", "https", "databricks", *DATABASE_SCHEMES)
SQLITE_MAGIC = b"SQLite format 3\x00"


class StoreError(BrainsegError):
    """A tracking store or study database that cannot be used; the message names its URL
    (password masked) and what is wrong."""


def mask_password(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part shown as ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")  # the last '@': a password may hold '@' or '/'
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


def _answers(host: str, port: int) -> str:
    """'' when ``host:port`` accepts a connection within :data:`TIMEOUT_S`, else why not."""
    try:
        socket.create_connection((host, port), timeout=TIMEOUT_S).close()
    except OSError as err:
        return f"{host}:{port} does not answer ({err.strerror or type(err).__name__})"
    return ""


def _sqlite_problem(database: str | None) -> str:
    """What keeps a SQLite database file from being used ('' when nothing; memory is fine)."""
    if not database or database == ":memory:":
        return ""
    path = Path(database).expanduser()
    if not path.parent.is_dir():
        return f"folder {path.parent} does not exist"
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            if f.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                return f"{path} is not a SQLite database"
    return ""


def check_database(url: str, what: str) -> None:
    """A SQLAlchemy URL that parses, whose dialect and driver import, and whose database file
    (SQLite) or server answers; :class:`StoreError` naming ``what`` and the masked URL."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = f"{what} {mask_password(url)}"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(f"{shown}: not a database URL (dialect[+driver]://user:password@"
                         "host[:port]/database)") from None
    try:
        parsed.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise StoreError(f"{shown}: unknown database dialect "
                         f"'{parsed.drivername}'") from None
    except ImportError as err:
        raise StoreError(f"{shown}: its driver is not installed (no module '{err.name}'; "
                         "install it, or name the driver you have: dialect+driver://...)"
                         ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        problem = _sqlite_problem(parsed.database)
    elif not parsed.host:
        problem = "no host"
    else:
        problem = _answers(parsed.host, parsed.port or DEFAULT_PORTS.get(backend, 0))
    if problem:
        raise StoreError(f"{shown}: {problem}")


def _check_http(uri: str) -> None:
    """An MLflow server answers (any HTTP status will do) within :data:`TIMEOUT_S`."""
    url = urllib.parse.urlsplit(uri)
    health = url._replace(netloc=url.netloc.rpartition("@")[2],  # credentials: not for this
                          path=f"{url.path.rstrip('/')}/health").geturl()
    try:
        urllib.request.urlopen(health, timeout=TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise StoreError(f"tracking_uri {mask_password(uri)}: the server does not answer "
                         f"within {TIMEOUT_S:.0f} s ({reason})") from None


@functools.lru_cache(maxsize=8)
def check_tracking_uri(uri: str) -> None:
    """The MLflow tracking store ``uri`` can be used: MLflow installed, a known scheme, and
    its server or database answering ("" = tracking off: nothing to check). Checked once
    per process."""
    if not uri:
        return
    shown = f"tracking_uri {mask_password(uri)}"
    if importlib.util.find_spec("mlflow") is None:
        raise StoreError(f"{shown}: MLflow is not installed (pip install -e '.[mlflow]')")
    scheme = uri.partition(":")[0].split("+")[0].lower()
    if scheme == "file" or ":" not in uri and scheme != "databricks":
        raise StoreError(f"{shown}: MLflow 3 keeps no runs in a folder (its file store); use "
                         "a database (sqlite:///mlflow.db) or a server (http://host:5000)")
    if scheme not in TRACKING_SCHEMES:
        raise StoreError(f"{shown}: unknown scheme '{scheme}' (use one of "
                         f"{', '.join(s + ':' for s in TRACKING_SCHEMES)})")
    if scheme in ("http", "https"):
        _check_http(uri)
    elif scheme in DATABASE_SCHEMES:
        check_database(uri, "tracking_uri")
