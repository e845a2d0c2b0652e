import sys

from sample.cli import main

sys.exit(main())
