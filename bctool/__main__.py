"""Allow ``python -m bctool``."""

from bctool.cli import main

if __name__ == "__main__":
    main()
