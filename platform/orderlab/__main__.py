import sys

from orderlab.cli import main

sys.exit(main())
