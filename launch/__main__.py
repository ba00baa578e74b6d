"""``python -m launch LAUNCHER STAGE ...``: see :mod:`launch.submit`."""

import sys

from launch.submit import main

sys.exit(main())
