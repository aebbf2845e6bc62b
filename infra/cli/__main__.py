"""`python -m infra.cli ...`: the same as `fleet ...`."""

from infra.cli.app import main

if __name__ == "__main__":
    main()
