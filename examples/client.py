"""A blocking command-line client: sends each line of stdin, prints what comes back.

Run: ``python examples/client.py ws://127.0.0.1:8000/echo`` (against, for
example, ``python examples/echo.py``). Text messages are printed as they are,
binary ones as ``bytes`` reprs. At the end of stdin (Ctrl-D) it closes with
1000 and exits; if the server closes first, it says why and exits.

It is the package's own client, ``python -m gaman_sync.client URL``: read
``gaman_sync/client/__main__.py`` for how it works (the main thread prints
``for message in conn``; a second thread reads stdin and sends).
"""

import sys

from gaman_sync.client.__main__ import main

if __name__ == "__main__":
    sys.exit(main(prog="python examples/client.py"))
