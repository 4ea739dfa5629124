"""``python -m sdeflow.cli`` (as torchrun runs it) is the ``sdeflow`` command."""

import sys

from . import main

sys.exit(main())
