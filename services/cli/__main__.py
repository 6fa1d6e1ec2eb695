"""``python -m services.cli``: how `relay run`, the tests and the benchmarks start a role."""

from services.cli import main

if __name__ == "__main__":
    main()
