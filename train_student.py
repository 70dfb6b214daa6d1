"""Train the LR baseline student on low-resolution images with hard labels.

    python train_student.py --help
"""
from src.cli import run_main
from src.stages import train_main

if __name__ == "__main__":
    run_main(lambda: train_main("student"))
