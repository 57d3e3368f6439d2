"""Where things are: the repository root, its src/, configs/ and scripts/ folders."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
CONFIGS = REPO / "configs"
SCRIPTS = REPO / "scripts"
SUPPORT = Path(__file__).resolve().parent
