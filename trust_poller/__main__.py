"""`python -m trust_poller` is the same as the `trust-poller` command."""

from trust_poller.cli import main

if __name__ == "__main__":
    main()
