"""`python -m k3batch.cli`: the `k3batch` command."""

import sys

from k3batch.cli import main

sys.exit(main())
