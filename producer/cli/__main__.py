"""``python -m producer.cli``: the ``blipq`` command."""

from __future__ import annotations

import sys

from producer.cli.blipq import main

sys.exit(main())
