"""`python -m worker` is the same as the `sidecar-executor` command."""

import sys

from worker.cli import main

sys.exit(main())
