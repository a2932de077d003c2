"""A function of embedpipe run in a plain child Python process, for the driver's one-off heavy work.

Describing a model (pipeline.models.describe) and exporting it to ONNX (pipeline.models.onnx_graph)
import torch and sentence-transformers: seconds of CPU and hundreds of MiB that the
driver would otherwise hold for the whole run. A child does that work and exits, and
its memory goes with it. It is a plain `python -m pipeline.models.child` process, not
multiprocessing's spawn, which would import the caller's `__main__` again (a script
without an `if __name__ == "__main__":` guard would run twice).
"""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from pipeline.errors import EmbedpipeError, PipelineError


class ChildCall:
    """`module.function(*args)` started now in a child process; `result()` waits for its value.

    An EmbedpipeError raised there (the user's to fix) is raised here as it is; any other
    failure becomes a one-line PipelineError that begins with `what` failed.
    """

    def __init__(self, function: str, *args: Any, what: str):
        self.what = what
        self._dir = tempfile.mkdtemp(prefix="embedpipe-child-")
        with open(os.path.join(self._dir, "call"), "wb") as f:
            pickle.dump((function, args, what), f)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds pipeline/
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self._process = subprocess.Popen([sys.executable, "-m", "pipeline.models.child", self._dir], env=env,
                                         stdin=subprocess.DEVNULL)

    def result(self) -> Any:
        code = self._process.wait()
        try:
            with open(os.path.join(self._dir, "result"), "rb") as f:
                ok, value = pickle.load(f)
        except OSError:
            raise PipelineError(f"{self.what} failed: its process exited with code {code}") from None
        finally:
            self.close()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


def _main(directory: str) -> None:
    with open(os.path.join(directory, "call"), "rb") as f:
        function, args, what = pickle.load(f)
    try:
        module, name = function.split(":")
        outcome = (True, getattr(importlib.import_module(module), name)(*args))
    except EmbedpipeError as exc:  # the user's to fix: passed on as it is
        outcome = (False, exc)
    except Exception as exc:  # noqa: BLE001 - named in one line
        outcome = (False, PipelineError(f"{what} failed: {exc.__class__.__name__}: {exc}"[:500]))
    with open(os.path.join(directory, "result.tmp"), "wb") as f:
        pickle.dump(outcome, f)
    os.replace(os.path.join(directory, "result.tmp"), os.path.join(directory, "result"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown of torch and sentence-transformers: the driver is waiting


if __name__ == "__main__":
    _main(sys.argv[1])
