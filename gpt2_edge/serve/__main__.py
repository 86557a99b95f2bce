"""``python -m gpt2_edge.serve``: the server without the main CLI (whose parser imports torch)."""

import sys

from .cli import main

sys.exit(main())
