import sys

from napari_slpd.cli import main

sys.exit(main())
