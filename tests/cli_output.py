"""What a command printed on stderr, less the tool's own warning lines: a busy machine may add
one (device peaks measured under contention), which is output, not an error."""


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("dynaflow-tune: warning: ")]
