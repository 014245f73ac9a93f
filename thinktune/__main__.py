"""`python -m thinktune`: the CLI (thinktune.cli.main); nothing else."""
import sys

from thinktune.cli import main

sys.exit(main())
