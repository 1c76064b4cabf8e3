"""cafm_core is the method only: importing it must not pull in services."""

import subprocess
import sys

SERVICE_MODULES = ("prefect", "ray", "mlflow", "s3fs", "boto3", "botocore", "accelerate")


def test_cafm_core_imports_no_orchestration_tracking_or_storage_library():
    code = (
        "import sys, importlib, pkgutil, cafm_core\n"
        "for m in pkgutil.walk_packages(cafm_core.__path__, 'cafm_core.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print([m for m in {SERVICE_MODULES!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
