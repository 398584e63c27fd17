import sys

from gradual.cli import main

sys.exit(main())
