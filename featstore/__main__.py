"""``python -m featstore`` entry point (what ``torchrun -m featstore build ...`` runs)."""

from featstore.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
