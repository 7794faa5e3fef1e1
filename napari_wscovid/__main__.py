import sys

from napari_wscovid.cli import main

sys.exit(main())
