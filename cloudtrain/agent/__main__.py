"""`python -m cloudtrain_agent` (or `python -m cloudtrain.agent`): run the agent's CLI."""

import sys

from .cli import main

sys.exit(main())
