"""Train the LR student taught by the frozen HR teacher (alpha*CE + beta*T^2*KL).

    python train_kd_student.py --help
"""
from src.cli import run_main
from src.stages import train_main

if __name__ == "__main__":
    run_main(lambda: train_main("kd_student"))
