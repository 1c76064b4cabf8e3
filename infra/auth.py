"""The stack's own secrets: made once per stack by ``up``, kept in files only their owner can
read (mode 0600) under the stack's state folder, and handed to the services that need them
through their environment. They are never written to ``stack.json``, never printed except by
``python -m infra.stack env`` (which exists to print them), never logged.

====================  =====================================================================
``prefect-auth``      the Prefect server's API auth string (``PREFECT_SERVER_API_AUTH_STRING``
                      on the server; ``PREFECT_API_AUTH_STRING`` for its clients)
``mlflow-auth.ini``   MLflow's basic-auth configuration (``MLFLOW_AUTH_CONFIG_PATH``): the
                      admin user and password, the users database (``mlflow/auth.db``), and
                      the Flask secret key its forms need (section ``[cafm]``)
``s3-keys``           the one key pair the local S3 server accepts (``AWS_ACCESS_KEY_ID`` /
                      ``AWS_SECRET_ACCESS_KEY``); only with the local server
====================  =====================================================================

A file that another user could read (any group or other permission bit) or that another user
owns is refused with the command that fixes it: a secret that others could have read is not
kept silently. Deleting a file makes ``up`` generate a new secret and restart the service
that holds the old one (its health check authenticates, so it reads as unhealthy).
"""

from __future__ import annotations

import configparser
import io
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path

from infra.config import StackError

PREFECT_AUTH_FILE = "prefect-auth"
MLFLOW_AUTH_FILE = "mlflow-auth.ini"
S3_KEYS_FILE = "s3-keys"
MLFLOW_ADMIN = "cafm-admin"
# Every variable that carries one of the stack's secrets (or could override one): removed from
# the environment a service inherits, then set again only for the services that need it.
SECRET_VARIABLES = (
    "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_KEY",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)


@dataclass(frozen=True, repr=False)
class StackSecrets:
    """What the files hold (None where a file does not exist yet). ``repr`` shows names only."""

    home: Path
    prefect_auth: str | None = None
    mlflow_username: str | None = None
    mlflow_password: str | None = None
    mlflow_flask_key: str | None = None
    s3_key_id: str | None = None
    s3_secret: str | None = None

    def __repr__(self) -> str:
        held = [name for name in ("prefect_auth", "mlflow_password", "s3_secret") if getattr(self, name)]
        return f"StackSecrets(home={str(self.home)!r}, held={held})"

    __str__ = __repr__

    @property
    def mlflow_config(self) -> Path:
        return self.home / MLFLOW_AUTH_FILE

    def values(self) -> list[str]:
        """Every secret value held (what must appear in no log, state file or artifact)."""
        return [v for v in (self.prefect_auth, self.mlflow_password, self.mlflow_flask_key, self.s3_secret) if v]

    def need(self, *names: str) -> StackSecrets:
        """Self, or a :class:`StackError` naming the first missing secret's file."""
        files = {"prefect_auth": PREFECT_AUTH_FILE, "mlflow_password": MLFLOW_AUTH_FILE, "s3_secret": S3_KEYS_FILE}
        for name in names:
            if not getattr(self, name):
                raise StackError(f"the stack's secret {self.home / files[name]} does not exist yet: "
                                 "`python -m infra.stack up` makes it")
        return self

    # ---- what each kind of process gets ---------------------------------------------------
    def prefect_client_env(self) -> dict[str, str]:
        return {"PREFECT_API_AUTH_STRING": self.prefect_auth} if self.prefect_auth else {}

    def prefect_server_env(self, ui_origin: str) -> dict[str, str]:
        """The Prefect server: the auth string, CORS for the UI's own origin only, CSRF on."""
        env = {"PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ui_origin, "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true"}
        if self.prefect_auth:
            env["PREFECT_SERVER_API_AUTH_STRING"] = self.prefect_auth
            env.update(self.prefect_client_env())  # its own services call its API too
        return env

    def mlflow_client_env(self) -> dict[str, str]:
        if not (self.mlflow_username and self.mlflow_password):
            return {}
        return {"MLFLOW_TRACKING_USERNAME": self.mlflow_username, "MLFLOW_TRACKING_PASSWORD": self.mlflow_password}

    def mlflow_server_env(self) -> dict[str, str]:
        if not self.mlflow_flask_key:
            return {}
        return {"MLFLOW_AUTH_CONFIG_PATH": str(self.mlflow_config), "MLFLOW_FLASK_SERVER_SECRET_KEY": self.mlflow_flask_key}

    def s3_env(self) -> dict[str, str]:
        if not (self.s3_key_id and self.s3_secret):
            return {}
        return {"AWS_ACCESS_KEY_ID": self.s3_key_id, "AWS_SECRET_ACCESS_KEY": self.s3_secret}


# ---- files ---------------------------------------------------------------------------------

def _read(path: Path) -> str | None:
    """The file's text; None when it does not exist; an error when others could read it."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    if info.st_uid != os.getuid():
        raise StackError(f"{path} belongs to another user (uid {info.st_uid}); the stack's secrets must be yours: "
                         f"delete it (`up` makes a new one)")
    if info.st_mode & 0o077:
        raise StackError(f"{path} can be read by others (mode {oct(info.st_mode & 0o777)}); its secret may have been "
                         f"seen: delete it (`up` makes a new one and restarts the service that holds the old one), "
                         f"or `chmod 600 {path}` if no one else could have read it")
    return path.read_text()


def _create(path: Path, text: str) -> bool:
    """Write ``text`` to a new file ``path`` with mode 0600, atomically: written in full to a
    private temporary file first, then linked in place (which fails if ``path`` exists: a
    concurrent ``up`` made it first; its secret is kept). True when this call made it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _s3_key_id() -> str:
    return "AKIA" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16))


def _mlflow_ini(home: Path) -> str:
    config = configparser.ConfigParser(interpolation=None)
    config["mlflow"] = {
        "default_permission": "NO_PERMISSIONS",  # the admin is the only user; others get nothing unless granted
        "database_uri": f"sqlite:///{home / 'mlflow' / 'auth.db'}",
        "admin_username": MLFLOW_ADMIN,
        "admin_password": secrets.token_urlsafe(24),
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    config["cafm"] = {"flask_secret_key": secrets.token_hex(32)}
    text = io.StringIO()
    config.write(text)
    return text.getvalue()


def ensure_secrets(home: str | os.PathLike, *, local_s3: bool = True) -> StackSecrets:
    """Make each secret file that does not exist yet (``s3-keys`` only with ``local_s3``) and
    return them all; existing files are kept as they are (after the same checks as
    :func:`read_secrets`)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    read_secrets(home)  # refuse files others could read before adding to them
    _create(home / PREFECT_AUTH_FILE, f"cafm:{secrets.token_urlsafe(32)}\n")
    if _create(home / MLFLOW_AUTH_FILE, _mlflow_ini(home)):
        # a new admin password: an old users database would keep the old one (MLflow creates
        # the admin only when it is missing), so it goes too (it holds only the stack's admin)
        (home / "mlflow" / "auth.db").unlink(missing_ok=True)
    if local_s3:
        _create(home / S3_KEYS_FILE, f"AWS_ACCESS_KEY_ID={_s3_key_id()}\nAWS_SECRET_ACCESS_KEY={secrets.token_urlsafe(30)}\n")
    return read_secrets(home)


def read_secrets(home: str | os.PathLike) -> StackSecrets:
    """The secrets the files under ``home`` hold (None for a missing file); a file that others
    could read, or that another user owns, is a :class:`StackError`."""
    home = Path(home)
    fields: dict[str, str | None] = {}
    prefect = _read(home / PREFECT_AUTH_FILE)
    fields["prefect_auth"] = (prefect.strip() or None) if prefect is not None else None
    ini = _read(home / MLFLOW_AUTH_FILE)
    if ini is not None:
        config = configparser.ConfigParser(interpolation=None)
        try:
            config.read_string(ini)
            fields.update(mlflow_username=config["mlflow"]["admin_username"], mlflow_password=config["mlflow"]["admin_password"],
                          mlflow_flask_key=config["cafm"]["flask_secret_key"])
        except (configparser.Error, KeyError) as exc:
            raise StackError(f"{home / MLFLOW_AUTH_FILE} is not the stack's MLflow auth file ({type(exc).__name__}: "
                             f"{exc}); delete it (`up` makes a new one)") from None
    keys = _read(home / S3_KEYS_FILE)
    if keys is not None:
        pairs = dict(line.split("=", 1) for line in keys.splitlines() if "=" in line)
        fields.update(s3_key_id=pairs.get("AWS_ACCESS_KEY_ID") or None, s3_secret=pairs.get("AWS_SECRET_ACCESS_KEY") or None)
    return StackSecrets(home=home, **fields)
