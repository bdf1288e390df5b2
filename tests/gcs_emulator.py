"""A Cloud Storage emulator (`gcp-storage-emulator`, in memory) on a free loopback port, and the
environment that points gcsfs, etils.epath and TensorStore (Orbax's arrays) at it."""

from __future__ import annotations

import contextlib
import json
import importlib.util
import socket
import subprocess
import sys
import threading
import urllib.request

# The emulator's downloads lack the `x-goog-generation` header real Cloud Storage sends, which
# TensorStore reads before updating an object (Orbax's OCDBT manifest): added here.
_LAUNCHER = """
import sys
from gcp_storage_emulator import __main__ as cli, server
from gcp_storage_emulator.handlers import objects

real_download = objects.download

def download(request, response, storage, *args, **kwargs):
  real_download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:
    return
  response["x-goog-generation"] = obj["generation"]
  response["x-goog-metageneration"] = obj["metageneration"]

objects.download = download  # what `objects.get` calls for ?alt=media
for _, handlers in server.HANDLERS:
  for method, handler in list(handlers.items()):
    if handler is real_download:
      handlers[method] = download
cli.main(sys.argv[1:])
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def environment(url: str) -> dict[str, str]:
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,
      "EPATH_USE_TF": "false",
      # without it gcsfs probes each bucket over gRPC for a minute before using JSON
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


@contextlib.contextmanager
def running(bucket: str):
  """Yields the emulator's URL once `bucket` exists in it; stops it afterwards."""
  if importlib.util.find_spec("gcp_storage_emulator") is None:
    raise RuntimeError("gcp-storage-emulator is not installed: pip install -e '.[test]'")
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  process = subprocess.Popen(
      [
          sys.executable,
          "-c",
          _LAUNCHER,
          "start",
          "--host=127.0.0.1",
          f"--port={port}",
          "--in-memory",
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  try:
    said = []
    for line in process.stdout:  # blocks until the server says it serves, or exits
      said.append(line)
      if "All services started" in line:
        break
    else:
      raise RuntimeError(f"gcp-storage-emulator did not start: {''.join(said)[-2000:]}")
    # it logs every request: drained, so a full pipe never stalls it
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=test",
        data=json.dumps({"name": bucket}).encode(),
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=30).read()
    yield url
  finally:
    process.terminate()
    process.wait(timeout=30)
