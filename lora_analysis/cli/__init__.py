"""`lora-analysis` command line: one module per subcommand, registered in `main.py`."""

from .main import main

__all__ = ["main"]
