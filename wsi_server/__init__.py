"""wsi-server: a whole-slide digital pathology tile server."""

from wsi_server.app import create_app
from wsi_server.errors import WsiServerError
from wsi_server.settings import Settings

__version__ = "0.2.0"
__all__ = ["Settings", "WsiServerError", "__version__", "create_app"]
