"""Small helpers every layer uses: atomic writes and destination checks (``files``), and the option fields that
one dataclass turns into defaults, command-line flags, TOML keys and checks (``options``)."""
