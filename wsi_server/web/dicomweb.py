"""DICOMweb front under ``/dicomweb``: QIDO-RS searches, WADO-RS metadata, frames,
whole instances, rendered images and thumbnails, over the DICOM view of every slide
(``wsi_server.dicom``).

Every route resolves its slide through ``ctx.slide_by_id`` (the one access decision): a
slide the requester may not see is absent from searches and 404 for retrievals, exactly
like an unknown UID. Label and overview instances are withheld wherever the server
withholds the label and macro images.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from wsi_server.context import AppContext, principal
from wsi_server.dicom import frames as fr
from wsi_server.dicom import query as q
from wsi_server.dicom import stow
from wsi_server.dicom.model import InstanceModel, SlideModel
from wsi_server.dicom.service import DicomService
from wsi_server.errors import (
    BackendUnavailable,
    BadRequest,
    Forbidden,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    SlideNotFound,
    UnsupportedMediaType,
    WsiServerError,
)
from wsi_server.library import SlideEntry

PREFIX = "/dicomweb"
DICOM_JSON = "application/dicom+json"
_STUDY_KEYS = (
    "SpecificCharacterSet", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
    "ReferringPhysicianName", "StudyID", "StudyDescription", "PatientName", "PatientID",
    "PatientBirthDate", "PatientSex", "IssuerOfPatientID",
)
_SERIES_KEYS = (
    "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate",
    "SeriesTime", "Manufacturer", "ManufacturerModelName", "ContainerIdentifier",
    "FrameOfReferenceUID",
)
_SKIP_INSTANCE_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}
Handler = Callable[[Request], Awaitable[Response]]


class DicomJSON(JSONResponse):
    media_type = DICOM_JSON


def _base_url(ctx: AppContext, request: Request) -> str:
    root = ctx.settings.public_url or str(request.base_url)
    return root.rstrip("/") + PREFIX


def _json_accepted(request: Request) -> None:
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return
    for item in q.parse_accept(accept):
        if item.media_type in (DICOM_JSON, "application/json", "*/*", "application/*"):
            return
    raise NotAcceptable("searches and metadata answer application/dicom+json only")


def _pick(ds: Dataset, keywords: tuple[str, ...]) -> Dataset:
    out = Dataset()
    for kw in keywords:
        if kw in ds:
            out[kw] = ds[kw]
    return out


def routes(ctx: AppContext) -> list[BaseRoute]:
    service = DicomService(ctx.library, ctx.tiles, ctx.cache)

    # -- resolving -----------------------------------------------------------------------
    async def visible_models(request: Request) -> list[tuple[SlideEntry, SlideModel]]:
        entries = [e for e in ctx.visible_slides(request) if e.error is None]
        out = []
        for entry in entries:
            model = await service.model(entry)
            if model is not None:
                out.append((entry, model))
        return out

    async def resolve(request: Request, study: str, series: str | None = None,
                      instance: str | None = None
                      ) -> tuple[SlideEntry, SlideModel, InstanceModel | None]:
        sid = await service.slide_id_of(study)
        if sid is None:
            raise SlideNotFound("no study with this UID")
        try:
            entry = await ctx.slide_by_id(request, sid)
        except SlideNotFound:  # not yours: the same answer as an unknown UID
            raise SlideNotFound("no study with this UID") from None
        model = await service.model(entry)
        if model is None or model.study_uid != study:
            raise SlideNotFound("no study with this UID")
        if series is not None and model.series_uid != series:
            raise NotFound("no series with this UID in the study")
        inst = None
        if instance is not None:
            inst = next((i for i in model.visible(ctx.hidden_associated(request, entry))
                         if i.uid == instance), None)
            if inst is None:
                raise NotFound("no instance with this UID in the series")
        return entry, model, inst

    def path_uids(request: Request) -> tuple[str, str | None, str | None]:
        p = request.path_params
        return str(p["study"]), p.get("series"), p.get("instance")

    # -- QIDO-RS records -----------------------------------------------------------------
    def study_record(base: str, model: SlideModel, visible: tuple[InstanceModel, ...]
                     ) -> Dataset:
        rec = _pick(model.base.dataset, _STUDY_KEYS)
        rec.StudyInstanceUID = model.study_uid
        rec.ModalitiesInStudy = ["SM"]
        rec.NumberOfStudyRelatedSeries = 1
        rec.NumberOfStudyRelatedInstances = len(visible)
        rec.InstanceAvailability = "ONLINE"
        rec.RetrieveURL = f"{base}/studies/{model.study_uid}"
        return rec

    def series_record(base: str, model: SlideModel, visible: tuple[InstanceModel, ...]
                      ) -> Dataset:
        rec = study_record(base, model, visible)
        rec.update(_pick(model.base.dataset, _SERIES_KEYS))
        rec.SeriesInstanceUID = model.series_uid
        rec.NumberOfSeriesRelatedInstances = len(visible)
        rec.RetrieveURL = f"{base}/studies/{model.study_uid}/series/{model.series_uid}"
        return rec

    def instance_record(series: Dataset, model: SlideModel, inst: InstanceModel) -> Dataset:
        rec = Dataset()
        for elem in inst.dataset:
            if elem.VR not in _SKIP_INSTANCE_VRS and elem.tag.group != 0x0002:
                rec.add(elem)
        rec.update(series)
        rec.AvailableTransferSyntaxUID = list(inst.transfer_syntaxes)
        rec.InstanceAvailability = "ONLINE"
        # a new element: the one ``update`` copied is the series record's own object
        del rec.RetrieveURL
        rec.RetrieveURL = f"{series.RetrieveURL}/instances/{inst.uid}"
        return rec

    async def search(request: Request, level: q.Level) -> Response:
        _json_accepted(request)
        query = q.parse_qido(request.query_params.multi_items())
        study, series, _ = (str(request.path_params["study"]) if "study" in request.path_params
                            else None), request.path_params.get("series"), None
        base = _base_url(ctx, request)
        records: list[Dataset] = []
        for entry, model in await visible_models(request):
            if study is not None and model.study_uid != study:
                continue
            if series is not None and model.series_uid != series:
                continue
            visible = model.visible(ctx.hidden_associated(request, entry))
            if level == "study":
                records.append(study_record(base, model, visible))
                continue
            srec = series_record(base, model, visible)
            if level == "series":
                records.append(srec)
            else:
                records += [instance_record(srec, model, i) for i in visible]
        found = q.search(records, query)
        return DicomJSON([q.response(r, query, level).to_json_dict() for r in found])

    def search_handler(level: q.Level) -> Handler:
        async def handler(request: Request) -> Response:
            return await search(request, level)
        return handler

    # -- WADO-RS metadata ----------------------------------------------------------------
    async def metadata(request: Request) -> Response:
        _json_accepted(request)
        study, series, instance = path_uids(request)
        entry, model, inst = await resolve(request, study, series, instance)
        hidden = ctx.hidden_associated(request, entry)
        base = _base_url(ctx, request)
        chosen = [inst] if inst is not None else list(model.visible(hidden))
        body = [
            service.instance_json(
                i, hidden,
                f"{base}/studies/{model.study_uid}/series/{model.series_uid}/instances/"
                f"{i.uid}/bulkdata/pixeldata")
            for i in chosen
        ]
        return DicomJSON(body, headers={"Cache-Control": ctx.cache_control(request, False)})

    # -- WADO-RS frames ------------------------------------------------------------------
    async def frames(request: Request) -> Response:
        study, series, instance = path_uids(request)
        entry, _, inst = await resolve(request, study, series, instance)
        assert inst is not None
        indices = q.parse_frame_list(str(request.path_params["frames"]), inst.frame_count)
        answer = q.negotiate_frames(request.headers.get("accept", ""), inst.transfer_syntax,
                                    inst.transfer_syntaxes)
        if answer is None:
            raise NotAcceptable(
                "frames of this instance are available in "
                + ", ".join(inst.transfer_syntaxes))
        data = await service.frames(entry, inst, indices, answer.syntax)
        headers = {"Cache-Control": ctx.cache_control(request, True)}
        if not answer.multipart:
            if len(data) != 1:
                raise NotAcceptable("several frames are answered as multipart/related only")
            return Response(data[0], media_type=answer.part_type.split(";")[0],
                            headers=headers)
        boundary = fr.new_boundary()
        part_media = answer.part_type.split(";")[0]
        body = fr.multipart_body(boundary, answer.part_type, data)
        return Response(
            body, headers=headers,
            media_type=f'multipart/related; type="{part_media}"; boundary={boundary}')

    async def bulk_pixeldata(request: Request) -> Response:
        study, series, instance = path_uids(request)
        entry, _, inst = await resolve(request, study, series, instance)
        assert inst is not None
        answer = q.negotiate_frames(request.headers.get("accept", ""), inst.transfer_syntax,
                                    inst.transfer_syntaxes)
        if answer is None or not answer.multipart:
            raise NotAcceptable("pixel data is answered as multipart/related in "
                                + ", ".join(inst.transfer_syntaxes))
        boundary = fr.new_boundary()
        part_type = answer.part_type

        async def body() -> AsyncIterator[bytes]:
            n = inst.frame_count
            for start in range(0, n, 16):
                batch = await service.frames(entry, inst, range(start, min(n, start + 16)),
                                             answer.syntax)
                yield b"".join(fr.multipart_part(boundary, part_type, f) for f in batch)
            yield fr.multipart_end(boundary)

        part_media = part_type.split(";")[0]
        return StreamingResponse(
            body(), media_type=f'multipart/related; type="{part_media}"; boundary={boundary}')

    # -- WADO-RS instances ---------------------------------------------------------------
    async def retrieve(request: Request) -> Response:
        study, series, instance = path_uids(request)
        entry, model, inst = await resolve(request, study, series, instance)
        hidden = ctx.hidden_associated(request, entry)
        chosen = [inst] if inst is not None else list(model.visible(hidden))
        single = _single_part_dicom(request.headers.get("accept", ""), inst is not None)
        if single:
            assert inst is not None
            return StreamingResponse(
                service.part10(entry, inst, hidden), media_type="application/dicom",
                headers={"Content-Disposition": f'attachment; filename="{inst.uid}.dcm"'})
        boundary = fr.new_boundary()

        async def body() -> AsyncIterator[bytes]:
            for i in chosen:
                yield (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n"
                       .encode("ascii"))
                async for chunk in service.part10(entry, i, hidden):
                    yield chunk
                yield b"\r\n"
            yield fr.multipart_end(boundary)

        return StreamingResponse(
            body(),
            media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')

    # -- rendered and thumbnails ---------------------------------------------------------
    async def rendered(request: Request) -> Response:
        study, series, instance = path_uids(request)
        entry, _, inst = await resolve(request, study, series, instance)
        fmt = q.rendered_format(request.headers.get("accept", ""))
        if fmt is None:
            raise NotAcceptable("rendered images are image/jpeg or image/png")
        viewport = q.parse_viewport(request.query_params.get("viewport"))
        quality_raw = request.query_params.get("quality", str(ctx.settings.jpeg_quality))
        if not quality_raw.isdigit() or not 1 <= int(quality_raw) <= 100:
            raise BadRequest("quality must be an integer from 1 to 100")
        frame = None
        if "frames" in request.path_params:
            assert inst is not None
            numbers = q.parse_frame_list(str(request.path_params["frames"]), inst.frame_count)
            if len(numbers) != 1:
                raise BadRequest("a rendered frame is one frame")
            frame = numbers[0]
        if inst is None:  # study or series thumbnail: the thumbnail of the slide
            size = max(viewport) if viewport else 256
            data, _ = await ctx.tiles.thumbnail(entry.id, size)
            return Response(data, media_type="image/jpeg",
                            headers={"Cache-Control": ctx.cache_control(request, False)})
        if viewport is None and "thumbnail" in request.url.path.rsplit("/", 1)[-1]:
            viewport = (256, 256)
        data = await service.rendered(entry, inst, frame, viewport, fmt, int(quality_raw))
        return Response(data, media_type=f"image/{fmt}",
                        headers={"Cache-Control": ctx.cache_control(request, False)})

    # -- STOW-RS -------------------------------------------------------------------------
    async def store(request: Request) -> Response:
        return await stow_rs(ctx, request)

    study = PREFIX + "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    return [
        Route(instance + "/frames/{frames}/rendered", rendered),
        Route(instance + "/frames/{frames}", frames),
        Route(instance + "/bulkdata/pixeldata", bulk_pixeldata),
        Route(instance + "/metadata", metadata),
        Route(instance + "/rendered", rendered),
        Route(instance + "/thumbnail", rendered),
        Route(instance, retrieve),
        Route(series + "/instances", search_handler("instance")),
        Route(series + "/metadata", metadata),
        Route(series + "/thumbnail", rendered),
        Route(series, retrieve),
        Route(study + "/series", search_handler("series")),
        Route(study + "/instances", search_handler("instance")),
        Route(study + "/metadata", metadata),
        Route(study + "/thumbnail", rendered),
        Route(study, retrieve),
        Route(study, store, methods=["POST"]),
        Route(PREFIX + "/studies", search_handler("study")),
        Route(PREFIX + "/studies", store, methods=["POST"]),
        Route(PREFIX + "/series", search_handler("series")),
        Route(PREFIX + "/instances", search_handler("instance")),
    ]


def _single_part_dicom(accept: str, one_instance: bool) -> bool:
    """Whether a retrieve answers one bare ``application/dicom`` body (asked for as such,
    for one instance) rather than ``multipart/related; type="application/dicom"``."""
    if not one_instance:
        return False
    items: list[Any] = q.parse_accept(accept) if accept.strip() else []
    for item in items:
        if item.media_type == "application/dicom":
            return True
        if item.media_type in ("multipart/related", "*/*", "multipart/*"):
            return False
    return False


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


async def stow_rs(ctx: AppContext, request: Request) -> Response:
    """``POST /dicomweb/studies[/{study}]``: STOW-RS into the ingest pipeline.

    Refusals of the whole request are JSON errors: 503 without ``--ingest``, 403 for a
    requester who is not an administrator, 415 for another media type, 413 past
    ``--stow-max-mb``, 400 for a body that is not multipart with its boundary. Otherwise
    the answer is the PS3.18 status document: 200 all stored, 202 some, 409 none.
    ``?urgent=true`` puts the instances in the urgent queue. Every request leaves one
    ``dicom.store`` audit record.
    """
    who = principal(request)
    client = request.client.host if request.client else None
    tally: dict[str, Any] = {"bytes": 0}
    try:
        outcome, urgent = await _stow(ctx, request, tally)
    except WsiServerError as exc:
        await ctx.auth.record("dicom.store", who, outcome="failure", client=client,
                              detail={**tally, "stored": 0, "error": exc.code})
        raise
    await ctx.auth.record(
        "dicom.store", who, outcome="success" if outcome.stored else "failure", client=client,
        detail={**tally, "stored": len(outcome.stored), "failed": len(outcome.failed),
                "series": len(outcome.folders), "urgent": urgent,
                "reasons": sorted(set(stow.iter_reasons(outcome)))[:10]},
    )
    document = stow.status_document(outcome, _base_url(ctx, request))
    return DicomJSON(document.to_json_dict(), status_code=outcome.status)


async def _stow(ctx: AppContext, request: Request, tally: dict[str, Any]
                ) -> tuple[stow.Outcome, bool]:
    watch = ctx.settings.ingest
    if watch is None:
        raise BackendUnavailable("STOW-RS needs the ingest pipeline: start the server with "
                                 "--ingest WATCH_DIR")
    if not principal(request).is_admin:
        raise Forbidden("storing instances is for administrators")
    study = request.path_params.get("study")
    if study is not None and not stow.valid_uid(str(study)):
        raise BadRequest("the study in the URL is not a valid UID")
    raw_urgent = request.query_params.get("urgent", "").strip().lower()
    if raw_urgent not in _TRUE | _FALSE:
        raise BadRequest("urgent must be true or false")
    urgent = raw_urgent in _TRUE
    boundary = stow.boundary_of(request.headers.get("content-type", ""))
    if boundary is None:
        raise UnsupportedMediaType(
            'STOW-RS takes multipart/related; type="application/dicom" with a boundary')
    limit = ctx.settings.stow_max_mb * 2**20
    too_large = PayloadTooLarge(f"the body is over {ctx.settings.stow_max_mb} MB")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    work = await ctx.tiles.run(stow.new_work_dir, Path(watch))
    try:
        body = work / "body"
        with open(body, "wb") as f:
            async for chunk in request.stream():
                tally["bytes"] += len(chunk)
                if tally["bytes"] > limit:
                    raise too_large
                f.write(chunk)
        try:
            parts = await ctx.tiles.run(stow.split_parts, body, boundary, work)
        except stow.MalformedBody as exc:
            raise BadRequest(f"the body is not multipart/related: {exc}") from None
        body.unlink()
        if not parts:
            raise BadRequest("the body holds no instance")
        target = Path(watch) / ctx.settings.ingest_urgent_dir if urgent else Path(watch)
        outcome = await ctx.tiles.run(stow.store_parts, parts, study, work, target)
    finally:
        await ctx.tiles.run(stow.remove_work_dir, work)
    return outcome, urgent
