from pipeline.cli import run

if __name__ == "__main__":  # not when imported (multiprocessing's spawn imports __main__)
    run()
