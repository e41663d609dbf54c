"""`python -m app` starts Tandem."""

import sys

from app.main import main

sys.exit(main())
