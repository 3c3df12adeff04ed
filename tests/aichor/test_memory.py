"""The web process caps glibc's malloc arenas (aichor.lib.memory): upload parts in flight on
executor threads otherwise left it tens of MiB larger (bench/datasets.py measures that)."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="arenas are glibc's")

# Threads allocate and free as request threads do, then glibc reports its heaps (one per arena).
PROGRAM = """
import ctypes, os, sys, tempfile, threading
if sys.argv[1] == "capped":
    from aichor.lib.memory import limit_malloc_arenas
    assert limit_malloc_arenas()
if sys.argv[1] == "web":
    import aichor.asgi  # what uvicorn loads
def work():
    blocks = [bytearray(300_000) for _ in range(50)]
    del blocks
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(None)
libc.fdopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fflush.argtypes = [ctypes.c_void_p]
with tempfile.TemporaryFile() as f:
    out = libc.fdopen(os.dup(f.fileno()), b"w")
    libc.malloc_info(0, out)
    libc.fflush(out)
    f.seek(0)
    print(f.read().decode().count("<heap nr="))
"""


def heaps(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_threads_share_two_malloc_arenas_once_capped():
    assert heaps("capped") == 2
    assert heaps("default") > 2  # without the cap, threads of a 2-core machine get more


def test_the_web_process_caps_its_arenas_when_it_loads():
    assert heaps("web") == 2
