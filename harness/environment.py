"""Facts about the software and device a run used, recorded in every run file."""

import platform
import sys
from importlib.metadata import PackageNotFoundError, version


def _version(package):
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def device_name():
    """'metal', 'cuda' or 'cpu': where MLX runs by default on this machine."""
    import mlx.core as mx

    if mx.default_device().type == mx.DeviceType.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else "gpu"


def environment():
    """Versions and device, as plain data."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "device": device_name(),
        "executable": sys.executable,
    }
