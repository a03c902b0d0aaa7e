"""Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) as a judge of the DICOMweb front:
as a DICOMweb client, it retrieves a study from our live server into itself; its stored
instances are all of ours and their pixel data decode (in Orthanc, with DCMTK) to our
frames."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

D = "/dicomweb"


@pytest.fixture
def served(live_server: Callable[..., str], synthetic_dir: Path, tmp_path: Path) -> str:
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in ("aperio-rgb.svs", "aperio-j2k-ycbcr.svs"):
        shutil.copy(synthetic_dir / name, lib / name)
    return live_server(lib, state_dir=tmp_path / "state")


def _value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


def test_orthanc_retrieves_a_study_from_us(served: str, orthanc_server: Any) -> None:
    orthanc = orthanc_server(servers={"wsi": {"Url": f"{served}{D}/"}})
    ours = httpx.get(f"{served}{D}/studies").json()
    assert len(ours) == 2
    for study in ours:
        uid = _value(study, "0020000D")
        count = _value(study, "00201208")
        r = httpx.post(f"{orthanc.dicomweb}/servers/wsi/retrieve",
                       json={"Resources": [{"Study": uid}]}, timeout=120)
        assert r.status_code == 200, (r.text, orthanc.log_text()[-2000:])
        found = httpx.post(f"{orthanc.url}/tools/find",
                           json={"Level": "Study", "Query": {"StudyInstanceUID": uid}}).json()
        assert len(found) == 1, orthanc.log_text()[-2000:]
        instances = httpx.get(f"{orthanc.url}/studies/{found[0]}/instances").json()
        assert len(instances) == count
        mine = {_value(i, "00080018"): i for i in
                httpx.get(f"{served}{D}/studies/{uid}/instances").json()}
        for inst in instances:
            tags = httpx.get(f"{orthanc.url}/instances/{inst['ID']}/simplified-tags").json()
            sop = tags["SOPInstanceUID"]
            assert sop in mine
            # Orthanc decodes the first frame itself (DCMTK): it must be our frame 1
            png = httpx.get(f"{orthanc.url}/instances/{inst['ID']}/frames/0/preview",
                            timeout=60)
            assert png.status_code == 200, (tags.get("ImageType"), png.text[:200])
            assert png.content[:4] == b"\x89PNG", (tags.get("ImageType"), png.headers)
            theirs = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")).astype(int)
            url = mine[sop]["00081190"]["Value"][0]
            frame = httpx.get(f"{url}/frames/1", headers={"Accept": "image/jpeg"}).content
            expected = np.asarray(Image.open(io.BytesIO(frame)).convert("RGB")).astype(int)
            assert theirs.shape == expected.shape
            mad = np.abs(theirs - expected).mean()
            assert mad <= 3, (tags.get("ImageType"), mad)
