"""Build hook: the wheel carries the viewer's pinned OpenSeadragon build.

The metadata is in ``pyproject.toml``; this file only extends ``build_py``. When a wheel is
built, OpenSeadragon is installed from the npm registry with ``npm ci --omit=dev`` from
``package.json`` and ``package-lock.json`` (the pinned version and its integrity hash), in a
temporary folder (the source tree's ``node_modules`` is left as it is), and its build folder
is copied into the package as ``wsi_server/viewer/osd/``, where the viewer finds it. Nothing
of it is committed. Editable installs (``pip install -e .``) skip this: they serve
``node_modules`` of the source tree (``npm ci``, as ``./dev`` does).

``WSI_BUILD_WITHOUT_VIEWER=1`` builds a wheel without it (the viewer page then says how to
install it); without npm the build fails and says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
OSD_BUILD = Path("node_modules", "openseadragon", "build", "openseadragon")
PACKAGED = Path("wsi_server", "viewer", "osd")


def install_openseadragon(dest: Path) -> None:
    """``npm ci --omit=dev`` of the pinned packages in a temporary folder, then the
    OpenSeadragon build folder copied to ``dest``."""
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit(
            "building the wsi-server wheel needs npm (Debian package npm) to install the "
            "viewer's pinned OpenSeadragon; set WSI_BUILD_WITHOUT_VIEWER=1 to build without it"
        )
    with tempfile.TemporaryDirectory(prefix="wsi-build-osd-") as tmp:
        for name in ("package.json", "package-lock.json"):
            shutil.copy(HERE / name, tmp)
        subprocess.run(
            [npm, "ci", "--omit=dev", "--ignore-scripts", "--no-audit", "--no-fund",
             "--loglevel=error"],
            cwd=tmp, check=True, stdout=subprocess.DEVNULL,
        )
        if dest.exists():
            shutil.rmtree(dest)
        # the minified script and the button images: what the viewer serves
        shutil.copytree(Path(tmp) / OSD_BUILD, dest,
                        ignore=shutil.ignore_patterns("*.map", "openseadragon.js"))


class BuildWithViewer(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False) or os.environ.get("WSI_BUILD_WITHOUT_VIEWER"):
            return
        install_openseadragon(Path(self.build_lib) / PACKAGED)


setup(cmdclass={"build_py": BuildWithViewer})
