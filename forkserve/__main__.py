"""``python -m forkserve``: the same as the ``forkserve`` command.

Imports only ``forkserve.cli``.
"""

from forkserve.cli import main

if __name__ == "__main__":
    main()
