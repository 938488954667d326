"""``python -m dgm``: the same as the ``dgm`` command."""
import sys

from .cli import main

sys.exit(main())
