"""``python -m federation.cli``: how ``federation up`` starts its nodes and gateway."""

import sys

from federation.cli import main

sys.exit(main())
