import sys

from noisynn.cli import main

sys.exit(main())
