"""``python -m utils.convert``, the command's former name: see ``autoregressive/convert.py``."""
import sys


def main(argv=None):
    from autoregressive.convert import main as convert  # the command lives above both model packages

    return convert(argv)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
