"""Audit records as a FHIR R4 ``Bundle`` of ``AuditEvent`` resources.

The resources are built with the maintained ``fhir.resources`` models (the R4B package,
whose AuditEvent is R4's), following IHE Basic Audit Log Patterns (BALP).

Action mapping (``type`` / ``subtype`` / ``action``):

==================  ===============================  ========================  ======
wsi-server action   type                             subtype                   action
==================  ===============================  ========================  ======
``auth.login``      DCM 110114 User Authentication   DCM 110122 Login          E
``auth.failure``    DCM 110114 User Authentication   DCM 110122 Login          E
``auth.logout``     DCM 110114 User Authentication   DCM 110123 Logout         E
``slide.view``      audit-event-type ``rest``        restful-interaction read  R
``share.open``      audit-event-type ``rest``        restful-interaction read  R
``share.create``    DCM 110100 Application Activity                            C
``share.revoke``    DCM 110100 Application Activity                            D
``ingest.*``        DCM 110107 Import                                          C
``admin.*``, other  DCM 110100 Application Activity                            E
==================  ===============================  ========================  ======

Every event also carries the wsi-server action itself as a subtype in the code system
``urn:wsi-server:audit-action``, so nothing is lost in the export. Outcome: ``0``
(success) or ``4`` (minor failure). Agents: the actor (``requestor``; BALP user type IRCP
for reads, AGNT otherwise; identifier ``urn:wsi-server:actor``; the client's IP as
network address) and the server (DCM 110152 Destination Role ID). ``source.observer`` is
the server. The slide is an entity (``what.identifier`` in ``urn:wsi-server:slide``,
System Object / Domain Resource) holding the record's detail, one ``detail`` per key with
the value as JSON text; an aggregated ``slide.view`` has a ``period`` from its first to
its last view and a ``count`` detail.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from fhir.resources.R4B.auditevent import (
    AuditEvent,
    AuditEventAgent,
    AuditEventAgentNetwork,
    AuditEventEntity,
    AuditEventEntityDetail,
    AuditEventSource,
)
from fhir.resources.R4B.bundle import Bundle, BundleEntry
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.period import Period
from fhir.resources.R4B.reference import Reference

from wsi_server.store._time import utcnow
from wsi_server.store.audit import AuditRecord

DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ROLE_CLASS = "http://terminology.hl7.org/CodeSystem/v3-RoleClass"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ACTION_SYSTEM = "urn:wsi-server:audit-action"
ACTOR_SYSTEM = "urn:wsi-server:actor"
SLIDE_SYSTEM = "urn:wsi-server:slide"

_USER_AUTH = (DCM, "110114", "User Authentication")
_LOGIN = (DCM, "110122", "Login")
_LOGOUT = (DCM, "110123", "Logout")
_REST = (EVENT_TYPE, "rest", "Restful Operation")
_READ = (RESTFUL, "read", "read")
_APP = (DCM, "110100", "Application Activity")
_IMPORT = (DCM, "110107", "Import")

_Code = tuple[str, str, str]
# action -> (type, standard subtype or None, action code)
_EXACT: dict[str, tuple[_Code, _Code | None, str]] = {
    "auth.login": (_USER_AUTH, _LOGIN, "E"),
    "auth.failure": (_USER_AUTH, _LOGIN, "E"),
    "auth.logout": (_USER_AUTH, _LOGOUT, "E"),
    "slide.view": (_REST, _READ, "R"),
    "share.open": (_REST, _READ, "R"),
    "share.create": (_APP, None, "C"),
    "share.revoke": (_APP, None, "D"),
}


def event_codes(action: str) -> tuple[_Code, _Code | None, str]:
    """(type, standard subtype or None, action code) of a wsi-server action."""
    if action in _EXACT:
        return _EXACT[action]
    if action.startswith("ingest."):
        return _IMPORT, None, "C"
    return _APP, None, "E"


def _coding(code: _Code) -> Coding:
    system, value, display = code
    return Coding(system=system, code=value, display=display)


def _concept(system: str, code: str, display: str) -> CodeableConcept:
    return CodeableConcept(coding=[Coding(system=system, code=code, display=display)])


def audit_event(record: AuditRecord, server_name: str) -> AuditEvent:
    """One audit record as a FHIR ``AuditEvent``."""
    type_, subtype, action_code = event_codes(record.action)
    subtypes = [_coding(subtype)] if subtype is not None else []
    subtypes.append(Coding(system=ACTION_SYSTEM, code=record.action, display=record.action))
    reading = action_code == "R"
    user = AuditEventAgent(
        type=_concept(PARTICIPATION, "IRCP", "information recipient")
        if reading
        else _concept(ROLE_CLASS, "AGNT", "agent"),
        who=Reference(
            display=record.actor_name,
            identifier=Identifier(system=ACTOR_SYSTEM, value=record.actor),
        ),
        requestor=True,
        network=AuditEventAgentNetwork(address=record.client, type="2")
        if record.client
        else None,
    )
    server = AuditEventAgent(
        type=_concept(DCM, "110152", "Destination Role ID"),
        who=Reference(display=server_name),
        requestor=False,
    )
    details: list[AuditEventEntityDetail] = []
    if record.count > 1:
        details.append(AuditEventEntityDetail(type="count", valueString=str(record.count)))
    for key, value in (record.detail or {}).items():
        details.append(AuditEventEntityDetail(type=str(key), valueString=json.dumps(value)))
    entities: list[AuditEventEntity] = []
    if record.slide is not None or details:
        entities.append(
            AuditEventEntity(
                what=Reference(identifier=Identifier(system=SLIDE_SYSTEM, value=record.slide))
                if record.slide is not None
                else None,
                type=Coding(system=ENTITY_TYPE, code="2", display="System Object"),
                role=Coding(system=OBJECT_ROLE, code="4", display="Domain Resource"),
                detail=details or None,
            )
        )
    return AuditEvent(
        id=str(record.id),
        type=_coding(type_),
        subtype=subtypes,
        action=action_code,
        period=Period(start=record.time, end=record.last_time)
        if record.last_time != record.time
        else None,
        recorded=record.time,
        outcome="0" if record.outcome == "success" else "4",
        agent=[user, server],
        source=AuditEventSource(
            observer=Reference(display=server_name),
            type=[Coding(system=SOURCE_TYPE, code="4", display="Application Server")],
        ),
        entity=entities or None,
    )


def audit_bundle(records: Iterable[AuditRecord], server_name: str) -> dict[str, Any]:
    """A FHIR R4 ``collection`` Bundle of the records' AuditEvents, as JSON-ready data."""
    bundle = Bundle(
        type="collection",
        timestamp=utcnow(),
        entry=[BundleEntry(resource=audit_event(r, server_name)) for r in records] or None,
    )
    return bundle.model_dump(mode="json")
