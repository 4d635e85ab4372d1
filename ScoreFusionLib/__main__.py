"""``python -m ScoreFusionLib`` runs the ``scorefusion`` command."""

import sys

from .cli.main import main

sys.exit(main())
