"""Placeholder replaced below."""
def main(argv: list[str]) -> int:
    return 0
