"""`python -m cirron_otel`: the `cirron-otel` command line."""

from cirron_otel.cli import main

if __name__ == "__main__":
    main(prog_name="cirron-otel")
