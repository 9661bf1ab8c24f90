"""``python -m fastmeta.profile``: see fastmeta/profile/__init__.py."""
import sys

from . import main

sys.exit(main())
