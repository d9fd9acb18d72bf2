"""forkserve: a pre-fork WSGI and ASGI server built on a Python translation of Node's cluster."""

__version__ = "0.1.0"
