"""`python -m proxy` is the `ndovu-proxy` command."""

import sys

from proxy.cli import main

sys.exit(main())
