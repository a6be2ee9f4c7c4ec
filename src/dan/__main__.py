import sys

from dan.cli import main

sys.exit(main())
