"""The jobs shipped with the platform, run by `fleet up` like a data engineer's job files."""
