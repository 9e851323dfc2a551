"""``federation up``: the whole federation on one machine, supervised.

``up`` starts PostgreSQL, the nodes and the gateway as child processes
(``python -m federation.cli node …``, described in ``children``) and never
imports them; ``supervisor`` restarts what exits; ``lifeline`` is the pipe that
stops the children when the supervisor goes; ``state`` is the supervisor's state
file, which ``/health`` and ``federation status`` read.
"""
