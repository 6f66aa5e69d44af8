"""``python -m lsi_guard_app.web``: serve the demo for a finished run."""

import sys

from lsi_guard_app.web.app import main

sys.exit(main())
