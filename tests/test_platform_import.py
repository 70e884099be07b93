"""platform/ is a source root, never a package: the standard library's `platform` must win, in the
repo root and inside a Ray worker whose working dir is the repo (as with `ray job submit --working-dir .`)."""

import subprocess
import sys

import pytest

from helpers import REPO


def test_no_platform_package_file():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_from_repo_root():
    out = subprocess.run(
        [sys.executable, "-c", "import platform, sys; print(platform.python_version()); print(platform.__file__)"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out[0] == ".".join(map(str, sys.version_info[:3]))
    assert not out[1].startswith(str(REPO))


PROBE = """
import os, platform, ray
ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env={"working_dir": "."})

@ray.remote
def probe():
    import platform
    return platform.python_version(), platform.__file__, os.getcwd()

print(*ray.get(probe.remote()))
print(platform.__file__)
ray.shutdown()
"""


@pytest.mark.slow  # starts a local Ray
def test_stdlib_platform_inside_ray_worker():
    # A job-level working_dir (as `ray job submit --working-dir .` sets) puts the uploaded repo first
    # on every worker's sys.path: the worker must still import the standard library's platform.
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version, path, cwd = proc.stdout.split("\n")[-3].split()
    assert version == ".".join(map(str, sys.version_info[:3]))
    assert cwd != str(REPO) and "runtime_resources" in cwd  # really ran in the uploaded copy
    assert not path.startswith(cwd), f"the stdlib module was shadowed by {path}"
