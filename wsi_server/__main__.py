import sys

from wsi_server.cli import main

sys.exit(main())
