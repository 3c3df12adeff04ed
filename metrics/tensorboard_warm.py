"""A TensorBoard waiting for its command line (metrics.tensorboard keeps one spare per web
process). Importing TensorBoard and its plugins is most of its start-up (seconds on a busy
machine), and none of it depends on the logdir: done ahead, a first view only waits for the
server to bind and read the event files.

Every TensorBoard of aichor runs through this file, spare or not. Started as `python -P tensorboard_warm.py` (-P: this folder, whose tensorboard.py would shadow
the package, stays off sys.path). Reads one JSON line from stdin, {"args": [...], "env": {...}},
then runs TensorBoard as `tensorboard.main` would; end of input (the web process is gone) ends it
unused. Credentials come through stdin, never the command line."""

import json
import os
import sys
import zipfile

import google_crc32c
from absl import app
from tensorboard import assets, default, main_lib, program
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.plugins import base_plugin
from tensorboard.plugins.core import core_plugin

# Without TensorFlow, TensorBoard checks every record of an event file with a CRC32C computed in
# pure Python, byte by byte: a minute for a few megabytes on a busy machine. The same checksum in C.
pywrap_tensorflow.crc32c = google_crc32c.value

PLUGINS = default.get_plugins()  # the dynamic ones are found through package metadata: slow too

# TensorBoard gzips each of its ~90 frontend files when it builds its app (a second of CPU); the
# same bytes every time, so they are compressed here, ahead. Should a later TensorBoard change
# this private function, the lookup misses and it compresses as before.
_gzip = core_plugin._gzip
_gzipped: dict[bytes, bytes] = {}


def _gzip_ahead(content: bytes) -> bytes:
    found = _gzipped.get(content)
    return found if found is not None else _gzip(content)


provider = assets.get_default_assets_zip_provider()
if provider:
    with provider() as stream, zipfile.ZipFile(stream) as bundle:
        for name in bundle.namelist():
            content = bundle.read(name)
            _gzipped[content] = _gzip(content)
core_plugin._gzip = _gzip_ahead


def main() -> None:
    line = sys.stdin.readline()
    if not line.strip():
        return  # the web process ended without using this spare
    order = json.loads(line)
    os.environ.update(order.get("env", {}))
    sys.argv = ["tensorboard", *order["args"]]
    main_lib.global_init()
    board = program.TensorBoard(plugins=PLUGINS)
    try:
        app.run(board.main, flags_parser=board.configure)
    except base_plugin.FlagsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
