import sys

from thinktune.cli import main

sys.exit(main())
