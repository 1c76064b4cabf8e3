"""The one rule for "is the process that opened this MLflow run (or wrote this record) alive"."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tasks.tracking import OWNER_HOST_TAG, OWNER_PID_TAG, owner_state


def _tags(pid, host=None):
    return {OWNER_HOST_TAG: host or socket.gethostname(), OWNER_PID_TAG: str(pid)}


def test_this_process_and_a_running_child_are_alive():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert owner_state(_tags(os.getpid())) == "alive"
        assert owner_state(_tags(child.pid)) == "alive"
    finally:
        child.kill()
        child.wait()


def test_a_finished_process_is_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert owner_state(_tags(child.pid)) == "gone"


def test_another_host_or_no_usable_pid_is_unknown():
    assert owner_state(_tags(os.getpid(), host=socket.gethostname() + "-elsewhere")) == "unknown"
    assert owner_state({OWNER_HOST_TAG: socket.gethostname()}) == "unknown"
    assert owner_state(_tags("not-a-pid")) == "unknown"
    assert owner_state({}) == "unknown"
