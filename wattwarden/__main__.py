"""``python -m wattwarden``."""

import sys

from wattwarden.cli import main

sys.exit(main())
