import sys

from mitm_wg.cli import main

sys.exit(main())
