"""``python -m histoscan`` runs the CLI."""

from histoscan.cli import main

if __name__ == "__main__":
    main()
