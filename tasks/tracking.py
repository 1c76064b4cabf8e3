"""MLflow tracking for the pipeline: one parent run per pipeline run, a nested run per stage.

Only plain parameters are logged; anything that looks like a secret (keys, tokens,
passwords, credentials) is refused, and storage credentials never appear here at all:
they come from the environment. The post-trained generator is registered in the Model
Registry with alias ``candidate``; ``champion`` moves only when evaluation says so.

An unavailable server never stops training: calls are queued and sent, in order, once it is
back (see :class:`Tracker`); what is still queued after a stage is written to storage by the
pipeline (``<run>/tracking_unlogged.json``). Registration needs the server at that moment:
when it is down the model is not registered and the evaluation stage says so.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import mlflow
from mlflow import MlflowClient

log = logging.getLogger(__name__)

SECRET_MARKERS = ("secret", "password", "token", "access_key", "credential", "api_key")
MLFLOW_MODEL_CODE = str(Path(__file__).with_name("registry_model.py"))
PROTOCOL_TAG = "cafm.protocol_id"  # on every evaluation run and registered version: the protocol its numbers belong to
DATASET_TAG = "cafm.dataset"  # on registered models and versions: the identity of the data they were trained on
WEIGHTS_TAG = "cafm.weights"  # on registered versions: sha256 of the checkpoint's checksum marker (one version per weights)


OWNER_HOST_TAG, OWNER_PID_TAG = "cafm.host", "cafm.pid"


def owner_state(tags: Mapping[str, str]) -> Literal["alive", "gone", "unknown"]:
    """Whether the process named by a run's (or a record's) owner tags is ``"alive"``, ``"gone"``
    or ``"unknown"`` (another host, or no usable pid): the one rule both the ending of orphaned
    runs (only ``"gone"``) and the replay of unlogged records (all but ``"alive"``) follow."""
    pid = tags.get(OWNER_PID_TAG)
    if tags.get(OWNER_HOST_TAG) != socket.gethostname() or pid is None or not str(pid).isdigit():
        return "unknown"
    if int(pid) == os.getpid():
        return "alive"
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:  # alive, another user's
        pass
    return "alive"


class TrackingError(RuntimeError):
    """The MLflow store cannot be used (unreachable server, bad URI)."""


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value


def flat_params(params: Mapping) -> dict[str, str]:
    """Nested parameters as ``a.b.c -> str``; refuses keys that look like secrets."""
    flat: dict = {}
    _flatten("", params, flat)
    leaked = [k for k in flat if any(m in k.lower() for m in SECRET_MARKERS)]
    if leaked:
        raise ValueError(f"refusing to log parameters that look like secrets: {leaked}")
    return {k: str(v)[:500] for k, v in flat.items()}


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail early, with the URI in the message, when the tracking store cannot be reached, or
    when a server with authentication refuses this process's login
    (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``, or ``MLFLOW_TRACKING_TOKEN``)."""
    if uri.startswith(("http://", "https://")):
        import base64
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).read()
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(f"MLflow tracking server {uri} is unreachable: {exc}") from exc
        headers = {}
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        if user and password:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
            headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        probe = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
        try:
            urllib.request.urlopen(probe, timeout=timeout_s).read()
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                given = f"the login of MLFLOW_TRACKING_USERNAME={user}" if headers and user else \
                    "the token in MLFLOW_TRACKING_TOKEN" if headers else "no login"
                raise TrackingError(
                    f"MLflow tracking server {uri} refused {given} (HTTP {exc.code}): set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD (`python -m infra.stack env` prints the local stack's)") from None
        except (urllib.error.URLError, OSError):
            pass  # it answered /health: a slow search is the tracker's to retry, not a reason to stop here
    elif uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)


_SHORT_HTTP_RETRIES = {
    # MLflow's defaults retry one request for minutes (7 retries, backoff factor 2, 120 s
    # timeout); with a server down that would stall the pipeline at every call. The Tracker
    # buffers instead, so one call may fail fast. A user's own settings win.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class Tracker:
    """MLflow runs for the pipeline, with a buffer that outlives an unavailable server.

    Runs and everything logged to them go through a queue sent in order with
    ``MlflowClient`` (explicit run ids, no global active run). A call that fails (server
    down, timeout) stays queued, training goes on, and later calls first try to send the
    queue again (at most every ``retry_after_s``), so a server that comes back receives
    everything, in order, each item once. :meth:`unlogged` says what is still queued
    (:func:`write_unlogged` puts it in storage, with the values, so nothing is lost).

    ``strict=True`` (the early check) raises :class:`TrackingError` when the store cannot be
    reached at construction; ``strict=False`` (the stages) starts buffered instead.
    """

    def __init__(self, tracking_uri: str, experiment: str, *, strict: bool = True, retry_after_s: float = 15.0) -> None:
        for key, value in _SHORT_HTTP_RETRIES.items():
            os.environ.setdefault(key, value)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.retry_after_s = float(retry_after_s)
        self.pending: list[dict] = []  # items not sent yet, oldest first
        self.last_error: str | None = None
        self._runs: dict[str, dict] = {}  # local key -> {"name", "run_id", ...}
        self._stack: list[str] = []  # this tracker's open runs, innermost last
        self._next_try = 0.0
        self.experiment_id: str | None = None
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        try:
            check_tracking_uri(tracking_uri)
            self.experiment_id = self._experiment_id()
        except TrackingError as exc:
            if strict:
                raise
            self.last_error = str(exc)
            log.warning("MLflow unavailable (%s): tracking is buffered until it returns", exc)

    def _experiment_id(self) -> str:
        try:
            existing = self.client.get_experiment_by_name(self.experiment)
            if existing is not None:
                return existing.experiment_id
            artifacts = None
            if self.tracking_uri.startswith("sqlite:///"):
                # keep artifacts beside the SQLite store, not in the current directory
                artifacts = (Path(self.tracking_uri[len("sqlite:///"):]).expanduser().resolve().parent / "mlartifacts").as_uri()
            return self.client.create_experiment(self.experiment, artifact_location=artifacts)
        except Exception as exc:  # noqa: BLE001 - any store error is reported the same way
            raise TrackingError(f"cannot use MLflow experiment {self.experiment!r} at {self.tracking_uri}: {exc}") from exc

    # ---- the queue -----------------------------------------------------------------------

    def _submit(self, item: dict) -> None:
        self.pending.append(item)
        self.flush(force=False)

    def flush(self, force: bool = True) -> bool:
        """Send what is queued, in order; True when nothing is left. Without ``force``, a
        recent failure makes this a no-op until ``retry_after_s`` has passed."""
        if not self.pending:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        while self.pending:
            try:
                self._send(self.pending[0])
            except Exception as exc:  # noqa: BLE001 - unreachable, timeouts, 5xx: all buffered alike
                first = self.last_error is None
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                self._next_try = time.monotonic() + self.retry_after_s
                (log.warning if first else log.info)(
                    "MLflow at %s unavailable (%s): %d item(s) buffered, training goes on",
                    self.tracking_uri, self.last_error, len(self.pending),
                )
                return False
            self.pending.pop(0)
        if self.last_error is not None:
            log.warning("MLflow at %s reachable again: every buffered item was logged", self.tracking_uri)
            self.last_error = None
        return True

    def _run_id(self, key: str) -> str:
        run_id = self._runs[key]["run_id"]
        if run_id is None:
            raise TrackingError(f"run {self._runs[key]['name']!r} was not created yet")
        return run_id

    def _send(self, item: dict) -> None:
        kind = item["kind"]
        if kind == "create_run":
            if self.experiment_id is None:
                self.experiment_id = self._experiment_id()
            run = self._runs[item["run"]]
            tags = dict(item["tags"])
            parent = item["parent"]
            local = parent[len("unlogged-"):] if parent and parent.startswith("unlogged-") else parent
            if local in self._runs:  # a run of this tracker (maybe created late)
                parent = self._runs[local]["run_id"]
            if parent and not str(parent).startswith("unlogged-"):
                tags["mlflow.parentRunId"] = parent
            elif parent:
                tags["cafm.parent_unlogged"] = parent
            if run["run_id"] is None:
                run["run_id"] = self.client.create_run(self.experiment_id, tags=tags, run_name=run["name"]).info.run_id
            if item["params"]:
                from mlflow.entities import Param

                params = [Param(k, v) for k, v in item["params"].items()]
                for i in range(0, len(params), 100):
                    self.client.log_batch(run["run_id"], params=params[i : i + 100])
        elif kind == "metrics":
            from mlflow.entities import Metric

            run_id = self._run_id(item["run"])
            metrics = [Metric(k, v, ts, step) for k, v, step, ts in item["values"][item.get("sent", 0):]]
            for i in range(0, len(metrics), _BATCH):
                self.client.log_batch(run_id, metrics=metrics[i : i + _BATCH])
                item["sent"] = item.get("sent", 0) + len(metrics[i : i + _BATCH])  # resend nothing twice
        elif kind == "text":
            self.client.log_text(self._run_id(item["run"]), item["text"], item["artifact_file"])
        elif kind == "image":
            from PIL import Image

            image = Image.open(io.BytesIO(base64.b64decode(item["png_base64"])))
            self.client.log_image(self._run_id(item["run"]), image, artifact_file=item["artifact_file"])
        elif kind == "artifacts":
            self.client.log_artifacts(self._run_id(item["run"]), item["local_dir"], item["artifact_path"])
        elif kind == "end_run":
            self.client.set_terminated(self._run_id(item["run"]), item["status"])
        else:  # pragma: no cover - items are made here
            raise ValueError(f"unknown tracking item {kind!r}")

    def _current(self) -> str:
        if not self._stack:
            raise TrackingError("no open run: log inside `with tracker.run(...)`")
        return self._stack[-1]

    # ---- runs and what is logged to them -------------------------------------------------

    @contextmanager
    def run(self, name: str, params: Mapping | None = None, *, parent_run_id: str | None = None,
            tags: Mapping | None = None) -> Iterator[str]:
        """Open a run (nested under ``parent_run_id``, else under this tracker's open run);
        yields its MLflow id, or ``unlogged-<key>`` while the server is unavailable."""
        key = uuid.uuid4().hex
        parent = parent_run_id
        if parent is None and self._stack:
            parent = self._stack[-1]
        self._runs[key] = {"name": name, "run_id": None}
        # who owns the run: lets a later process end it if this one is killed (end_orphaned_runs)
        owner = {OWNER_HOST_TAG: socket.gethostname(), OWNER_PID_TAG: str(os.getpid())}
        self._submit({"kind": "create_run", "run": key, "name": name, "parent": parent,
                      "params": flat_params(params) if params else {},
                      "tags": {**owner, **{str(k): str(v) for k, v in (tags or {}).items()}}})
        self._stack.append(key)
        status = "FAILED"
        try:
            yield self._runs[key]["run_id"] or f"unlogged-{key}"
            status = "FINISHED"
        finally:
            self._stack.pop()
            self._submit({"kind": "end_run", "run": key, "status": status})

    def end_orphaned_runs(self, tag: str, value: str) -> list[str]:
        """End as ``KILLED`` the runs still ``RUNNING`` with ``tag == value`` whose owner process
        is gone (same host, pid no longer alive), as a killed pipeline leaves them; tags each
        with why. Runs of a live process or of another host are left alone. Best effort: an
        unavailable server ends nothing. Returns the ids of the runs ended."""
        if not self.flush() or self.experiment_id is None or "'" in value:
            return []
        ended = []
        try:
            runs = self.client.search_runs([self.experiment_id], filter_string=(
                f"tags.`{tag}` = '{value}' and attributes.status = 'RUNNING'"), max_results=1000)
            for found in runs:
                tags = found.data.tags
                if owner_state(tags) != "gone":
                    continue
                self.client.set_tag(found.info.run_id, "cafm.ended_by",
                                    f"process {os.getpid()} on {socket.gethostname()}: its owner "
                                    f"(pid {tags[OWNER_PID_TAG]}) stopped without ending it")
                self.client.set_terminated(found.info.run_id, "KILLED")
                ended.append(found.info.run_id)
        except Exception as exc:  # noqa: BLE001 - housekeeping must never stop a run
            log.warning("could not end the runs a stopped process left RUNNING (%s)", exc)
        if ended:
            log.warning("ended %d MLflow run(s) left RUNNING by a stopped process (%s = %s): %s", len(ended), tag,
                        value, ", ".join(ended))
        return ended

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, prefix: str = "") -> None:
        self._log_rows([(metrics, step)], prefix)

    def _log_rows(self, rows, prefix: str) -> None:
        now = int(time.time() * 1000)
        values = [
            (f"{prefix}{k}", float(v), int(step or 0), now)
            for metrics, step in rows
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        ]
        if values:
            self._submit({"kind": "metrics", "run": self._current(), "values": values})

    def log_summary_row(self, row: Mapping, prefix: str = "") -> None:
        """One evaluation summary row (a model at a sampler setting) as metrics named
        ``<prefix>nfe<N>.cfg<s>.<metric>``."""
        setting = f"{prefix}nfe{row['nfe']}.cfg{row['cfg_scale']:g}."
        self.log_metrics({k: v for k, v in row.items() if k not in ("model", "method", "nfe", "cfg_scale", "seeds")},
                         prefix=setting)

    def log_history(self, rows, prefix: str = "") -> None:
        """Log training rows (each with a ``step``) as metric series, in one batch."""
        self._log_rows([(row, int(row.get("step", 0))) for row in rows], prefix)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit({"kind": "text", "run": self._current(), "text": text, "artifact_file": artifact_file})

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, default=str), artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        self._submit({"kind": "image", "run": self._current(), "artifact_file": artifact_file,
                      "png_base64": base64.b64encode(buffer.getvalue()).decode("ascii")})

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        """Artifacts from a local folder (it must outlive a buffered call: not a temp dir)."""
        self._submit({"kind": "artifacts", "run": self._current(), "local_dir": local_dir, "artifact_path": artifact_path})

    def unlogged(self) -> list[dict]:
        """What is still queued, one line each (run, kind, what), for logs and reports."""
        out = []
        for item in self.pending:
            run = self._runs.get(item.get("run"), {}).get("name", "?")
            what = {
                "create_run": lambda i: f"run {i['name']!r} with {len(i['params'])} params",
                "metrics": lambda i: f"{len(i['values']) - i.get('sent', 0)} metric values "
                                     f"({', '.join(sorted({v[0] for v in i['values']})[:6])})",
                "text": lambda i: f"artifact {i['artifact_file']}",
                "image": lambda i: f"image {i['artifact_file']}",
                "artifacts": lambda i: f"artifacts {i['local_dir']} -> {i['artifact_path']}",
                "end_run": lambda i: f"end of run ({i['status']})",
            }[item["kind"]](item)
            out.append({"run": run, "kind": item["kind"], "what": what})
        return out

    def unlogged_record(self) -> dict:
        """Everything still queued, values included, and the process that queued it: what the
        pipeline stores as ``tracking_unlogged.json`` and :meth:`replay` sends later."""
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment, "error": self.last_error,
                OWNER_HOST_TAG: socket.gethostname(), OWNER_PID_TAG: str(os.getpid()),
                "runs": {k: dict(v) for k, v in self._runs.items()}, "summary": self.unlogged(),
                "items": [dict(item) for item in self.pending]}

    def replay(self, record: Mapping) -> bool:
        """Take over what an earlier process could not log (its :meth:`unlogged_record`) and
        send it, in order, before anything this tracker queued; True when all of it is sent.
        What is not sent stays queued here (and in this tracker's own record)."""
        if record.get("tracking_uri") != self.tracking_uri or record.get("experiment") != self.experiment:
            raise TrackingError(f"the unlogged record is for {record.get('tracking_uri')} / {record.get('experiment')!r}, "
                                f"not {self.tracking_uri} / {self.experiment!r}")
        self._runs.update({key: dict(value) for key, value in record["runs"].items()})
        self.pending[:0] = [dict(item) for item in record["items"]]
        return self.flush()

    # ---- model registry (needs the server now; reported, never buffered) -----------------

    def register_generator(self, checkpoint_dir: str, model_name: str, *, dataset: str,
                           tags: Mapping | None = None) -> tuple[str | None, str | None]:
        """Log the generator as a pyfunc model (from code) and register it as a version of
        ``model_name`` with the alias ``candidate``; returns ``(version, None)``. Weights that
        are registered already (same checksums) are not registered again: their version
        becomes the candidate.

        A registered model holds one lineage: its tag ``cafm.dataset`` is the identity of the
        data its first version was trained on, and a generator of other data (``dataset``)
        is refused: ``(None, reason)``. ``(None, reason)`` too when MLflow is unavailable
        (logged as a warning; the checkpoint stays in storage and can be registered later)."""
        if not self.flush():
            log.warning("MLflow unavailable: generator %s not registered as %r", checkpoint_dir, model_name)
            return None, f"MLflow unavailable ({self.last_error})"
        try:
            try:
                lineage = (self.client.get_registered_model(model_name).tags or {}).get(DATASET_TAG)
            except mlflow.exceptions.MlflowException:
                lineage = None  # a new registered model
            if lineage is not None and lineage != dataset:
                reason = (f"registered model {model_name!r} holds generators of dataset {lineage[:12]}; this one was "
                          f"trained on {dataset[:12]}: another lineage, never its champion. Register it under "
                          "another name (registered_model=...)")
                log.warning("%s", reason)
                return None, reason
            weights = hashlib.sha256((Path(checkpoint_dir) / "checkpoint.json").read_bytes()).hexdigest()
            same = [v for v in self.client.search_model_versions(f"name='{model_name}'")
                    if (v.tags or {}).get(WEIGHTS_TAG) == weights] if lineage is not None else []
            if same:  # these exact weights are registered already (e.g. a sampler-only variant): reuse it
                version = str(min(int(v.version) for v in same))
                self.client.set_registered_model_alias(model_name, "candidate", version)
                return version, None
            with mlflow.start_run(run_id=self._run_id(self._current())):
                info = mlflow.pyfunc.log_model(
                    name="generator",
                    python_model=MLFLOW_MODEL_CODE,
                    artifacts={"checkpoint": checkpoint_dir},
                    pip_requirements=["torch", "safetensors", "numpy"],
                    signature=generator_signature(checkpoint_dir),
                )
            version = mlflow.register_model(info.model_uri, model_name,
                                            tags={**dict(tags or {}), DATASET_TAG: dataset, WEIGHTS_TAG: weights}).version
            if lineage is None:
                self.client.set_registered_model_tag(model_name, DATASET_TAG, dataset)
            self.client.set_registered_model_alias(model_name, "candidate", version)
        except Exception as exc:  # noqa: BLE001 - the server went away between the flush and here
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("MLflow unavailable (%s): generator %s not registered as %r", self.last_error,
                        checkpoint_dir, model_name)
            return None, f"MLflow unavailable ({self.last_error})"
        return str(version), None


def generator_signature(checkpoint_dir: str):
    """The served generator's interface: a table with optional ``label`` and ``seed`` columns
    (one row per image), params ``nfe``, ``method``, ``cfg_scale``; one flattened image per
    row out (values in [-1, 1], shape ``sample_shape`` of the checkpoint's config)."""
    import math

    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from cafm_core.checkpoint import load_checkpoint
    from cafm_core.models import config_from_dict

    _, saved, _ = load_checkpoint(checkpoint_dir)  # verified; the config the generator is rebuilt from
    config = config_from_dict(dict(saved))
    return ModelSignature(
        inputs=Schema([ColSpec("long", "label", required=False), ColSpec("long", "seed", required=False)]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, math.prod(config.sample_shape)))]),
        params=ParamSchema([ParamSpec("nfe", "long", 32), ParamSpec("method", "string", "heun"),
                            ParamSpec("cfg_scale", "double", 1.0)]),
    )


DEFAULT_TRACKING_STORE = "outputs/mlflow.db"


def default_tracking_uri() -> str:
    """The MLflow store every flow and the CLI use unless told otherwise: ``MLFLOW_TRACKING_URI``
    when set, else a SQLite file ``outputs/mlflow.db`` under the working directory."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(DEFAULT_TRACKING_STORE).resolve()}"


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on a store (loopback only)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1"
