"""Ingest pipeline on real files, with a real validator process and real moves."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from sample_slides import write_svs_like
from tests.conftest import real_slide
from wsi_server.ingest.mover import STAGING_DIR, content_hash
from wsi_server.ingest.pipeline import IngestConfig, IngestPipeline
from wsi_server.ingest.scanner import SettleTracker, Unit, discover
from wsi_server.readers import default_registry

SETTLE = 0.4


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ingest-src")
    return {
        "a": write_svs_like(d / "a.svs", 700, 500, tile=256, downsamples=(1, 4), seed=0),
        "b": write_svs_like(d / "b.svs", 700, 500, tile=256, downsamples=(1, 4), seed=7),
    }


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    watch, lib = tmp_path / "watch", tmp_path / "library"
    watch.mkdir()
    lib.mkdir()
    return watch, lib


@pytest.fixture
def make_pipeline(dirs: tuple[Path, Path]) -> Iterator[Callable[..., IngestPipeline]]:
    made: list[IngestPipeline] = []

    def make(**kw: object) -> IngestPipeline:
        kw.setdefault("settle_seconds", SETTLE)
        kw.setdefault("poll", True)
        kw.setdefault("poll_interval", 0.05)
        p = IngestPipeline(IngestConfig(dirs[0], dirs[1], **kw))  # type: ignore[arg-type]
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def wait_for(cond: Callable[[], object], timeout: float = 20.0,
             state: Callable[[], object] | None = None) -> None:
    """Until ``cond()``; on a timeout the failure shows ``state()`` (what was reached)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not reached in {timeout:g} s"
                         + (f"; state: {state()!r}" if state is not None else ""))


def library_files(lib: Path) -> list[Path]:
    return sorted(p for p in lib.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_slow_writer_is_taken_only_once_complete(
    dirs: tuple[Path, Path], slides: dict[str, Path], make_pipeline: Callable[..., IngestPipeline]
) -> None:
    watch, lib = dirs
    data = slides["a"].read_bytes()
    pipeline = make_pipeline()
    pipeline.start()
    finished = threading.Event()
    early: list[str] = []
    last_byte: list[float] = []

    def writer() -> None:
        chunks = 16
        step = len(data) // chunks + 1
        with open(watch / "slow.svs", "wb") as fh:
            for i in range(chunks):
                if i:
                    time.sleep(SETTLE * 0.6)  # pauses shorter than the settle time
                fh.write(data[i * step:(i + 1) * step])
                fh.flush()
        last_byte.append(time.time())
        finished.set()

    t = threading.Thread(target=writer)
    t.start()
    while not finished.is_set():
        if library_files(lib) or (watch / "quarantine").exists():
            early.append("taken while still being written")
        time.sleep(0.02)
    t.join()
    wait_for(lambda: next(pipeline.state.all()).state == "done")
    assert early == []
    assert (lib / "slow.svs").read_bytes() == data
    assert not (watch / "slow.svs").exists()
    rec = next(pipeline.state.all())
    assert rec.state == "done"
    assert rec.settled_at is not None and rec.settled_at >= last_byte[0] + SETTLE * 0.9


def _dicom_level(src: Path, dest: Path, factor: int) -> None:
    """A second instance of the same series: the level downsampled by ``factor``."""
    import openslide
    import pydicom
    import simplejpeg
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    with openslide.OpenSlide(str(src)) as osr:
        full = np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB"))
    ds = pydicom.dcmread(src)
    small = full[::factor, ::factor]
    sh, sw = full.shape[0] // factor, full.shape[1] // factor
    small = small[:sh, :sw]
    t = int(ds.Columns)
    frames = []
    for r in range(0, sh, t):
        for c in range(0, sw, t):
            tile = np.full((t, t, 3), 255, np.uint8)
            part = small[r:r + t, c:c + t]
            tile[: part.shape[0], : part.shape[1]] = part
            frames.append(simplejpeg.encode_jpeg(tile, quality=90, colorspace="RGB",
                                                 colorsubsampling="422"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = sw, sh
    ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(frames)
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    measures.PixelSpacing = [float(v) * factor for v in measures.PixelSpacing]
    ds.save_as(dest)


@pytest.mark.real_slides
def test_dicom_series_arriving_instance_by_instance(
    dirs: tuple[Path, Path], make_pipeline: Callable[..., IngestPipeline], tmp_path: Path
) -> None:
    watch, lib = dirs
    instances = sorted(real_slide("dicom").glob("*.dcm"))
    extra = tmp_path / "level1.dcm"
    _dicom_level(instances[0], extra, 2)
    arriving = [*instances, extra]
    pipeline = make_pipeline()
    pipeline.start()
    series = watch / "series-42"
    series.mkdir()
    for src in arriving:  # file by file, each in chunks, gaps shorter than the settle time
        data = src.read_bytes()
        with open(series / src.name, "wb") as fh:
            for i in range(0, len(data), len(data) // 4 + 1):
                fh.write(data[i:i + len(data) // 4 + 1])
                fh.flush()
                time.sleep(SETTLE * 0.3)
        assert not (lib / "series-42").exists(), "series taken before it was complete"
        time.sleep(SETTLE * 0.5)
    # a real DICOM series is checked in the validator process: give a loaded CI machine time
    wait_for(lambda: [r.state for r in pipeline.state.all()] == ["done"], timeout=60,
             state=lambda: ([(r.state, r.members, r.error) for r in pipeline.state.all()],
                            pipeline.state.events(20)))
    moved = sorted(p.name for p in (lib / "series-42").iterdir())
    assert moved == sorted(p.name for p in arriving)
    reader = default_registry().open(lib / "series-42")
    try:
        assert len(reader.metadata.levels) == 2
    finally:
        reader.close()
    assert [r.state for r in pipeline.state.all()] == ["done"]


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "unsupported", "empty-tiff"])
def test_bad_scans_go_to_quarantine_with_a_record(
    kind: str, dirs: tuple[Path, Path], slides: dict[str, Path],
    make_pipeline: Callable[..., IngestPipeline],
) -> None:
    watch, lib = dirs
    data = slides["a"].read_bytes()
    name, content = {
        "corrupt": ("scan.svs", data[:4096] + os.urandom(len(data) - 4096)),
        "truncated": ("scan.svs", data[: len(data) * 6 // 10]),
        "unsupported": ("notes.txt", b"not a slide\n" * 100),
        "empty-tiff": ("scan.tif", b"II*\x00" + b"\x00" * 60),
    }[kind]
    (watch / name).write_bytes(content)
    before = time.time()
    make_pipeline().run_until_idle()
    quarantined = watch / "quarantine" / name
    assert quarantined.read_bytes() == content, "the original is kept byte for byte"
    record = json.loads((watch / "quarantine" / f"{name}.error.json").read_text())
    assert record["failed_step"] == "validate"
    assert record["error"] in ("unreadable_slide", "unsupported_format")
    assert record["detail"]
    assert record["content_hash"] == content_hash([quarantined])[0]
    assert record["content_hash"] != content_hash([slides["a"]])[0]
    when = time.mktime(time.strptime(record["when"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert when >= int(before) - 1
    assert not (watch / name).exists()
    assert library_files(lib) == []


def test_a_hanging_or_crashing_validator_costs_only_its_process(
    dirs: tuple[Path, Path], slides: dict[str, Path],
    make_pipeline: Callable[..., IngestPipeline], monkeypatch: pytest.MonkeyPatch,
) -> None:
    watch, lib = dirs
    monkeypatch.setenv("WSI_INGEST_FAULT", "validate-hang:hangs,validate-crash:crashes")
    shutil.copy(slides["a"], watch / "hangs.svs")
    shutil.copy(slides["b"], watch / "crashes.svs")
    pipeline = make_pipeline(validate_timeout=1.5)
    pipeline.run_until_idle()
    codes = {
        n: json.loads((watch / "quarantine" / f"{n}.error.json").read_text())["error"]
        for n in ("hangs.svs", "crashes.svs")
    }
    assert codes == {"hangs.svs": "validator_timeout", "crashes.svs": "validator_crashed"}
    # The pipeline goes on with a fresh validator.
    shutil.copy(slides["a"], watch / "fine.svs")
    pipeline.run_until_idle()
    assert (lib / "fine.svs").read_bytes() == slides["a"].read_bytes()


def test_same_content_twice_is_recognised_and_kept_aside(
    dirs: tuple[Path, Path], slides: dict[str, Path], make_pipeline: Callable[..., IngestPipeline]
) -> None:
    watch, lib = dirs
    pipeline = make_pipeline()
    shutil.copy(slides["a"], watch / "a.svs")
    pipeline.run_until_idle()
    first = next(pipeline.state.all())
    shutil.copy(slides["a"], watch / "a.svs")
    shutil.copy(slides["a"], watch / "renamed.svs")
    pipeline.run_until_idle()
    assert [p.name for p in library_files(lib)] == ["a.svs"]
    for name in ("a.svs", "renamed.svs"):
        kept = watch / "duplicates" / name
        assert kept.read_bytes() == slides["a"].read_bytes()
        record = json.loads((watch / "duplicates" / f"{name}.duplicate.json").read_text())
        assert record["duplicate_of"]["slide_id"] == first.slide_id
        assert record["duplicate_of"]["library_path"] == "a.svs"
    states = sorted(r.state for r in pipeline.state.all())
    assert states == ["done", "duplicate", "duplicate"]


def test_same_name_different_content_gets_a_distinct_slide(
    dirs: tuple[Path, Path], slides: dict[str, Path], make_pipeline: Callable[..., IngestPipeline]
) -> None:
    watch, lib = dirs
    pipeline = make_pipeline()
    shutil.copy(slides["a"], watch / "case.svs")
    pipeline.run_until_idle()
    shutil.copy(slides["b"], watch / "case.svs")
    pipeline.run_until_idle()
    assert sha(lib / "case.svs") == sha(slides["a"])
    assert sha(lib / "case-2.svs") == sha(slides["b"])
    ids = [r.slide_id for r in pipeline.state.all()]
    assert len(set(ids)) == 2 and None not in ids


def test_urgent_scan_behind_ten_routine_ones_goes_first(
    dirs: tuple[Path, Path], slides: dict[str, Path], make_pipeline: Callable[..., IngestPipeline]
) -> None:
    watch, lib = dirs
    for i in range(10):
        write_svs_like(watch / f"routine-{i:02d}.svs", 300 + i, 200, tile=256, downsamples=(1,),
                       seed=100 + i, associated=False)
    (watch / "urgent").mkdir()
    time.sleep(0.05)
    shutil.copy(slides["b"], watch / "urgent" / "stat.svs")
    pipeline = make_pipeline()
    pipeline.run_until_idle()
    done = sorted(pipeline.state.recent(("done",), 100), key=lambda r: r.finished_at or 0)
    assert len(done) == 11
    assert done[0].source == "urgent/stat.svs"
    assert (lib / "stat.svs").exists(), "the urgent/ prefix is not kept in the library"


def test_urgent_scan_jumps_a_running_queue(
    dirs: tuple[Path, Path], slides: dict[str, Path], make_pipeline: Callable[..., IngestPipeline]
) -> None:
    watch, _ = dirs
    pipeline = make_pipeline()
    pipeline.start()
    for i in range(10):
        write_svs_like(watch / f"routine-{i:02d}.svs", 300 + i, 200, tile=256, downsamples=(1,),
                       seed=200 + i, associated=False)
    (watch / "urgent").mkdir()
    shutil.copy(slides["b"], watch / "urgent" / "stat.svs")
    wait_for(lambda: len(pipeline.state.recent(("done",), 100)) == 11, timeout=60)
    done = sorted(pipeline.state.recent(("done",), 100), key=lambda r: r.finished_at or 0)
    order = [r.source for r in done]
    # At most the routine scans already settled with it, or in hand, can precede it.
    assert order.index("urgent/stat.svs") <= 1, order


@pytest.mark.parametrize("where", ["forced-copy", "tmpfs"])
def test_move_across_filesystems_copies_verifies_and_removes_the_source(
    where: str, tmp_path: Path, slides: dict[str, Path]
) -> None:
    lib = tmp_path / "library"
    if where == "tmpfs":
        shm = Path("/dev/shm")
        if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("no tmpfs on another device")
        watch = Path(shm / f"wsi-ingest-{os.getpid()}-{time.monotonic_ns()}")
    else:
        watch = tmp_path / "watch"
    watch.mkdir()
    try:
        shutil.copy(slides["a"], watch / "far.svs")
        series = watch / "series"
        series.mkdir()
        (series / "x.dcm").write_bytes(b"not dicom" * 1000)  # a unit that fails validation
        pipeline = IngestPipeline(IngestConfig(
            watch, lib, settle_seconds=0.2, poll=True, poll_interval=0.05,
            force_copy=where == "forced-copy",
        ))
        pipeline.run_until_idle()
        recs = {r.source: r for r in pipeline.state.all()}
        pipeline.close()
        assert sha(lib / "far.svs") == sha(slides["a"])
        assert not (watch / "far.svs").exists()
        assert recs["far.svs"].copy and recs["far.svs"].state == "done"
        assert recs["series"].state == "quarantined"
        assert (watch / "quarantine" / "series" / "x.dcm").read_bytes() == b"not dicom" * 1000
        assert not (lib / STAGING_DIR).exists()
        assert not list(lib.rglob("*.part"))
    finally:
        if where == "tmpfs":
            shutil.rmtree(watch, ignore_errors=True)


def test_mrxs_file_and_its_folder_move_as_one(
    dirs: tuple[Path, Path], make_pipeline: Callable[..., IngestPipeline]
) -> None:
    watch, _ = dirs
    (watch / "case.mrxs").write_text("[GENERAL]\nnot really\n")
    (watch / "case").mkdir()
    (watch / "case" / "Data0000.dat").write_bytes(b"\x00" * 1000)
    (watch / "case" / "Slidedat.ini").write_text("[GENERAL]\n")
    units = discover(watch, "urgent", ())
    assert units == [Unit("case.mrxs", ("case.mrxs", "case"), False, "mrxs")]
    make_pipeline().run_until_idle()
    q = watch / "quarantine"
    assert (q / "case.mrxs").exists() and (q / "case" / "Data0000.dat").exists()
    assert (q / "case.mrxs.error.json").exists()
    assert sorted(p.name for p in watch.iterdir()) == ["quarantine"]


def test_a_dicom_series_is_one_unit_from_its_first_instance(tmp_path: Path) -> None:
    """A folder holding DICOM instances is one unit (the series), however deep, decided on
    one listing of the folder: a series caught with its first instance is never a lone
    file, which the next look would find "gone" when the second instance makes it a
    series (seen in CI: a folder listed empty, then its first file listed on its own)."""
    watch = tmp_path / "watch"
    (watch / "series-1").mkdir(parents=True)
    (watch / "series-1" / "a.dcm").write_bytes(b"x")
    (watch / "site" / "series-2").mkdir(parents=True)
    (watch / "site" / "series-2" / "b.dcm").write_bytes(b"x")
    (watch / "site" / "slide.svs").write_bytes(b"x")
    (watch / "urgent").mkdir()
    (watch / "urgent" / "lone.dcm").write_bytes(b"x")  # a file in a root is a file
    (watch / "lone.dcm").write_bytes(b"x")
    units = discover(watch, "urgent", ())
    assert sorted(units, key=lambda u: u.source) == sorted([
        Unit("lone.dcm", ("lone.dcm",), False, "file"),
        Unit("series-1", ("series-1",), False, "dicom"),
        Unit("site/series-2", ("site/series-2",), False, "dicom"),
        Unit("site/slide.svs", ("site/slide.svs",), False, "file"),
        Unit("urgent/lone.dcm", ("urgent/lone.dcm",), True, "file"),
    ], key=lambda u: u.source)


def test_a_series_folder_seen_empty_then_with_one_file_is_not_a_lone_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race itself: the folder's first listing is empty, the next has the instance."""
    watch = tmp_path / "watch"
    series = watch / "series-42"
    series.mkdir(parents=True)
    (series / "a.dcm").write_bytes(b"x")
    looks = {"n": 0}
    real_iterdir = Path.iterdir

    def iterdir(self: Path) -> Iterator[Path]:
        if self == series:
            looks["n"] += 1
            if looks["n"] == 1:
                return iter(())
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert discover(watch, "urgent", ()) == []  # nothing there yet, as far as it knows
    assert discover(watch, "urgent", ()) == [Unit("series-42", ("series-42",), False, "dicom")]


def test_work_in_progress_names_are_not_taken(
    dirs: tuple[Path, Path], slides: dict[str, Path], make_pipeline: Callable[..., IngestPipeline]
) -> None:
    watch, lib = dirs
    shutil.copy(slides["a"], watch / "scan.svs.part")
    (watch / "series").mkdir()
    (watch / "series" / "one.dcm").write_bytes(b"x")
    (watch / "series" / "two.dcm.tmp").write_bytes(b"x")
    pipeline = make_pipeline()
    end = time.monotonic() + SETTLE * 3
    while time.monotonic() < end:
        pipeline.step()
        time.sleep(0.02)
    assert library_files(lib) == [] and not (watch / "quarantine").exists()
    os.rename(watch / "scan.svs.part", watch / "scan.svs")
    os.rename(watch / "series" / "two.dcm.tmp", watch / "series" / "two.dcm")
    pipeline.run_until_idle()
    assert (lib / "scan.svs").exists()
    assert sorted(p.name for p in (watch / "quarantine" / "series").iterdir()) == [
        "one.dcm", "two.dcm"]


def test_settle_tracker_needs_an_unchanged_signature_for_the_settle_time(tmp_path: Path) -> None:
    now = [100.0]
    tracker = SettleTracker(5.0, clock=lambda: now[0])
    f = tmp_path / "s.svs"
    f.write_bytes(b"a")
    unit = Unit("s.svs", ("s.svs",), False, "file")
    assert tracker.observe(tmp_path, [unit]) == []
    now[0] += 4.9
    assert tracker.observe(tmp_path, [unit]) == []
    assert tracker.next_deadline() == pytest.approx(105.0)
    with open(f, "ab") as fh:
        fh.write(b"b")
    now[0] += 0.2  # past the first deadline, but the file changed
    assert tracker.observe(tmp_path, [unit]) == []
    now[0] += 5.0
    assert tracker.observe(tmp_path, [unit]) == [unit]
    assert tracker.observe(tmp_path, []) == [] and tracker.next_deadline() is None


def test_one_ingest_per_library_and_a_standby_takes_over(
    tmp_path: Path, slides: dict[str, Path]
) -> None:
    """With --workers N every worker starts ingest: one holds the library's lock and
    ingests, the others stand by and take over when it stops."""
    watch, lib = tmp_path / "watch", tmp_path / "library"
    config = IngestConfig(watch, lib, settle_seconds=0.2, poll=True, poll_interval=0.05)
    first, second = IngestPipeline(config), IngestPipeline(config)
    followed: list[Path] = []
    second.on_followed = followed.append
    try:
        first.start()
        wait_for(lambda: first.lock.held)
        second.start()
        shutil.copy(slides["a"], watch / "one.svs")
        wait_for(lambda: (lib / "one.svs").exists())
        # the standby is told of the slide the other published (its server lists it)
        wait_for(lambda: followed == [lib.resolve() / "one.svs"], timeout=10)
        assert not second.lock.held
        assert first.status()["runs_here"] and not second.status()["runs_here"]
        # both report the same queue and history: the state is the library's (the
        # journal records the outcome just after the file lands, so wait for it)
        wait_for(lambda: [r["name"] for r in first.status()["recent"]] == ["one.svs"])
        assert [r["name"] for r in second.status()["recent"]] == ["one.svs"]
        first.close()
        wait_for(lambda: second.lock.held, timeout=10)
        shutil.copy(slides["b"], watch / "two.svs")
        wait_for(lambda: (lib / "two.svs").exists())
        assert sorted(p.name for p in lib.iterdir() if not p.name.startswith(".")) == [
            "one.svs", "two.svs"
        ]
    finally:
        first.close()
        second.close()
