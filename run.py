"""Entry point: `python run.py` serves; `python run.py token --sub alice [--roles admin]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from conversational_core.cli import main

if __name__ == "__main__":
    sys.exit(main())
