import sys

from pipeline.cli import main

if __name__ == "__main__":  # not when imported (multiprocessing's spawn imports __main__)
    sys.exit(main())
