"""Train the HR teacher on the high-resolution (upscale_train/) images.

    python train_teacher.py --help
"""
from src.cli import run_main
from src.stages import train_main

if __name__ == "__main__":
    run_main(lambda: train_main("teacher"))
