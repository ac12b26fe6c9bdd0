import sys

from reservd.cli import main

sys.exit(main())
