"""The audit trail: who did or saw what, when, from where, with what outcome.

Each entry is one row of the store's append-only ``audit`` table and one ``audit.<action>``
log event. Its shape maps onto a DICOM PS3.15 (Annex A.5) audit message; :func:`ps315`
gives that mapping (``pxsgate audit --json`` prints it):

    event_time    EventDateTime
    action        EventID, EventTypeCode, EventActionCode (:data:`EVENTS`)
    outcome       EventOutcomeIndicator: 0 success; 4 minor failure (a wrong password, an
                  expired session: the user may try again); 8 serious failure (refused:
                  no CSRF token, a role too low, too many tries); 12 major failure (a
                  disabled user)
    user_name     ActiveParticipant UserID (UserIsRequestor), with its role
    peer_address  ActiveParticipant NetworkAccessPointID
    study_key     ParticipantObjectIdentification (a study, named by its key as in the
                  logs: a keyed hash of the UID, the UID itself only with logging.include-phi)

Nothing in an entry or event is a password; the detail never holds PHI.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any

import structlog

from pxsgate.store import AuditEntry, Store, audit_time

log = structlog.get_logger("pxsgate.audit")


class Action(StrEnum):
    LOGIN = "login"
    LOGIN_FAILED = "login-failed"
    LOGOUT = "logout"
    VIEW_WORKLIST = "view-worklist"
    VIEW_STUDY = "view-study"
    REVIEW = "review"
    RETRY_DELIVERY = "retry-delivery"
    FORCE_STUDY = "force-study"
    DENIED = "denied"
    USER_ADDED = "user-added"
    USER_REMOVED = "user-removed"
    USER_DISABLED = "user-disabled"
    USER_ENABLED = "user-enabled"


class Outcome(IntEnum):
    """PS3.15 EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


# (EventID, EventTypeCode or None, EventActionCode) per action; codes are DCM's (PS3.16).
_USER_AUTHENTICATION = ("110114", "User Authentication")
_PATIENT_RECORD = ("110110", "Patient Record")
_SECURITY_ALERT = ("110113", "Security Alert")
EVENTS: dict[str, tuple[tuple[str, str], tuple[str, str] | None, str]] = {
    Action.LOGIN: (_USER_AUTHENTICATION, ("110122", "Login"), "E"),
    Action.LOGIN_FAILED: (_USER_AUTHENTICATION, ("110122", "Login"), "E"),
    Action.LOGOUT: (_USER_AUTHENTICATION, ("110123", "Logout"), "E"),
    Action.VIEW_WORKLIST: (("110112", "Query"), None, "E"),
    Action.VIEW_STUDY: (_PATIENT_RECORD, None, "R"),
    Action.REVIEW: (_PATIENT_RECORD, None, "C"),
    Action.RETRY_DELIVERY: (("110106", "Export"), None, "E"),
    Action.FORCE_STUDY: (_PATIENT_RECORD, None, "U"),
    Action.DENIED: (_SECURITY_ALERT, ("110132", "Use of Restricted Function"), "E"),
    Action.USER_ADDED: (_SECURITY_ALERT, ("110136", "Security Roles Changed"), "C"),
    Action.USER_REMOVED: (_SECURITY_ALERT, ("110136", "Security Roles Changed"), "D"),
    Action.USER_DISABLED: (_SECURITY_ALERT, ("110136", "Security Roles Changed"), "U"),
    Action.USER_ENABLED: (_SECURITY_ALERT, ("110136", "Security Roles Changed"), "U"),
}


def ps315(entry: AuditEntry) -> dict[str, Any]:
    """One entry as the fields of a PS3.15 audit message (JSON-friendly)."""
    event_id, event_type, action_code = EVENTS.get(
        entry.action, (("110100", "Application Activity"), None, "E"))
    message: dict[str, Any] = {
        "id": entry.id, "time": entry.event_time, "user": entry.user_name,
        "role": entry.role, "action": entry.action, "outcome": entry.outcome,
        "studyKey": entry.study_key, "peer": entry.peer_address, "detail": entry.detail,
        "EventIdentification": {
            "EventID": {"code": event_id[0], "scheme": "DCM", "meaning": event_id[1]},
            "EventActionCode": action_code,
            "EventDateTime": entry.event_time,
            "EventOutcomeIndicator": entry.outcome,
        },
        "ActiveParticipant": {"UserID": entry.user_name, "RoleIDCode": entry.role,
                              "UserIsRequestor": True,
                              "NetworkAccessPointID": entry.peer_address},
    }
    if event_type is not None:
        message["EventIdentification"]["EventTypeCode"] = {
            "code": event_type[0], "scheme": "DCM", "meaning": event_type[1]}
    if entry.study_key:
        message["ParticipantObjectIdentification"] = {
            "ParticipantObjectTypeCode": 2,  # system object
            "ParticipantObjectTypeCodeRole": 3,  # report
            "ParticipantObjectIDTypeCode": {"code": "110180", "scheme": "DCM",
                                            "meaning": "Study Instance UID"},
            "ParticipantObjectID": entry.study_key}
    return message


class Auditor:
    """Writes audit entries: to the store, and as ``audit.<action>`` log events (a warning
    for any failure outcome)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def record(self, action: Action, outcome: Outcome, *, user: str, role: str,
                     peer: str, study_uid: str | None = None, detail: str = "") -> None:
        """Record one entry. ``study_uid``: the study concerned, stored and logged by its
        key (store.study_label)."""
        key = self._store.study_label(study_uid) if study_uid else ""
        entry = AuditEntry(audit_time(), user, role, str(action), int(outcome), key, peer,
                           detail)
        await self._store.record_audit(entry)
        emit = log.warning if outcome != Outcome.SUCCESS else log.info
        fields: dict[str, Any] = {"user": user, "role": role, "outcome": int(outcome),
                                  "peer": peer}
        if key:
            fields["study"] = key
        if detail:
            fields["detail"] = detail
        emit(f"audit.{action}", **fields)
