"""Evaluate the kd_student stage's best checkpoint on the test third of the shared split.

    python test_kd_student.py --help
"""
from src.cli import run_main
from src.stages import test_main

if __name__ == "__main__":
    run_main(lambda: test_main("kd_student"))
