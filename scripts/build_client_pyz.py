"""Build dist/portcullis-client.pyz: the light client and its dependencies in one file
that any Python 3.11+ runs (`python3 portcullis-client.pyz --help`).

Usage: python scripts/build_client_pyz.py DIST   (DIST holds the portcullis_client wheel)

Only pure Python goes in: a zip cannot load C extensions, so compiled modules are left
out. Each dependency we bundle has a pure-Python path (websockets' C speed-ups are
optional; uvloop is not bundled and the standard event loop is used), and the archive
is proved to start before it is written.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipapp
from pathlib import Path

COMPILED = ("*.so", "*.pyd", "*.dylib")
MAIN = """from portcullis.cli.client import main

main(prog_name="portcullis-client")
"""


def build(dist: Path) -> Path:
    wheels = sorted(dist.glob("portcullis_client-*.whl"))
    if not wheels:
        sys.exit(f"no portcullis_client wheel in {dist}: build it first (make dist)")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
                        "--disable-pip-version-check", "--target", str(tree),
                        str(wheels[-1])], check=True)
        shutil.rmtree(tree / "bin", ignore_errors=True)
        dropped = sorted(str(path.relative_to(tree)) for pattern in COMPILED
                         for path in tree.rglob(pattern))
        for name in dropped:
            (tree / name).unlink()
        (tree / "__main__.py").write_text(MAIN)
        target = dist / "portcullis-client.pyz"
        zipapp.create_archive(tree, target, interpreter="/usr/bin/env python3",
                              compressed=True)
    # -I -S: nothing from this environment (site-packages, PYTHONPATH) helps it start.
    subprocess.run([sys.executable, "-I", "-S", str(target), "--help"], check=True,
                   stdout=subprocess.DEVNULL)
    for name in dropped:
        print(f"left out (compiled; its pure-Python fallback is used): {name}")
    print(f"built {target}")
    return target


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "dist"))
