"""The edge broker's domain: enrollment, devices, the job queue, uploads, audit.

Plain async code over PostgreSQL and the file system; ``nodes/edge.py``
adapts it to gRPC. See ``docs/edge.md`` for the protocols.
"""
