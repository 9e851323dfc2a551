"""API keys and quotas <-> protobuf, for the KeyAuthorityService servicer."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration

from federation.errors import ErrorCode, FederationError
from federation.keys.models import IssueRequest, KeyState, KeyView, StrengthKind, StrengthSample
from federation.keys.quota import QuotaStatus
from federation.prototime import duration, timestamp, to_seconds
from federation.v1 import key_authority_pb2 as pb

STATE_TO_PROTO = {
    KeyState.ACTIVE: pb.KEY_STATE_ACTIVE, KeyState.SUSPENDED: pb.KEY_STATE_SUSPENDED,
    KeyState.REVOKED: pb.KEY_STATE_REVOKED, KeyState.EXPIRED: pb.KEY_STATE_EXPIRED,
}
KIND_TO_PROTO = {kind: getattr(pb, f"STRENGTH_EVENT_KIND_{kind.name}") for kind in StrengthKind}


def key_to_proto(view: KeyView) -> pb.ApiKey:
    record = view.record
    message = pb.ApiKey(
        key_id=record.key_id, tenant_id=record.tenant_id, scopes=list(record.scopes),
        state=STATE_TO_PROTO[view.state],  # type: ignore[arg-type]
        strength=view.strength, create_time=timestamp(record.created_at),
        description=record.description,
    )
    if record.last_used_at is not None:
        message.last_used_time.CopyFrom(timestamp(record.last_used_at))
    if record.revoked_at is not None:
        message.revoke_time.CopyFrom(timestamp(record.revoked_at))
    if record.expires_at is not None:
        message.expire_time.CopyFrom(timestamp(record.expires_at))
    if record.requests_per_minute is not None:
        message.requests_per_minute = record.requests_per_minute
    if record.token_quota is not None and record.quota_period_seconds is not None:
        message.token_quota = record.token_quota
        message.quota_period.CopyFrom(duration(record.quota_period_seconds))
    return message


def quota_to_proto(status: QuotaStatus) -> pb.QuotaStatus:
    message = pb.QuotaStatus(tokens_used=status.tokens_used)
    if status.tokens_remaining is not None:
        message.tokens_remaining = status.tokens_remaining
    if status.requests_remaining is not None:
        message.requests_remaining = status.requests_remaining
    if status.requests_reset_in is not None:
        message.requests_reset_in.CopyFrom(duration(max(status.requests_reset_in, 0.0)))
    if status.period_end is not None:
        message.period_end_time.CopyFrom(timestamp(status.period_end))
    if status.retry_after is not None:
        message.retry_after.CopyFrom(duration(max(status.retry_after, 0.0)))
    return message


def sample_to_proto(sample: StrengthSample) -> pb.StrengthSample:
    return pb.StrengthSample(time=timestamp(sample.at), strength=sample.strength,
                             kind=KIND_TO_PROTO[sample.kind], source=sample.source)


def _whole_seconds(value: Duration, param: str) -> int:
    """The period in seconds (its column's unit); a fraction is refused, not dropped: a
    period of 1.5 s became 1 s, and one of 0.5 s was refused as not positive."""
    if value.nanos:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, f"{param} must be whole seconds",
                              param=param)
    return value.seconds


def issue_request_from_proto(request: pb.IssueKeyRequest) -> IssueRequest:
    return IssueRequest(
        tenant_id=request.tenant_id, scopes=list(request.scopes),
        requests_per_minute=(request.requests_per_minute
                             if request.HasField("requests_per_minute") else None),
        token_quota=request.token_quota if request.HasField("token_quota") else None,
        quota_period_seconds=(_whole_seconds(request.quota_period, "quota_period")
                              if request.HasField("quota_period") else None),
        description=request.description,
        ttl_seconds=to_seconds(request.ttl) if request.HasField("ttl") else None,
    )
