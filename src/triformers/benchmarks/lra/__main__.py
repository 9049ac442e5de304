import sys

from triformers.benchmarks.lra import main

sys.exit(main())
