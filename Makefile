# make demo   set up .venv, write the demo data, run all seven stages, evaluate_all and predict on it
#             (another training seed: make demo DEMO_SEED=1 DEMO_RUNS=runs/demo-seed1)
# make test   set up .venv (with the optional trackers) and run the test suite in 2 processes (the 15 slowest tests listed at the end)
# make test-fast  the tests marked fast (pytest -m fast): the edit-test loop, every module touched
# make bench  set up .venv and run the training-speed benchmark
# make bench-processes  seconds per epoch of the demo teacher with 1 and 2 processes (torchrun)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= demo_data
DEMO_RUNS ?= runs/demo
# Demo: 2,500 labelled synthetic images (LR 8 px, HR 32 px, 25 classes) and 2,000 HR images
# without labels, the transfer set the KD student's teacher labels; ResNet18 from scratch at
# 32 px, 10 epochs of warm-up + cosine, the final model. DEMO_SEED is the training seed
# (split, initialisation, order): the README's spread over seeds 0-4 comes from it.
DEMO_SEED ?= 0
DEMO_DATA_ARGS := --per-class 100 --lr-size 8 --scale 4 --unlabelled 2000 --test-images 1000
DEMO_TRAIN := --arch resnet18 --weights none --input-size 32 --batch-size 64 --lr 2e-3 \
              --schedule cosine --warmup-epochs 1 --select-by last --seed $(DEMO_SEED)
DEMO_ARGS := --data-dir $(DEMO_DATA) --out-dir $(DEMO_RUNS) $(DEMO_TRAIN) --epochs 10 --overwrite
# The KD student also learns from the teacher's labels of the unlabelled HR images, with the
# KD term dominant as in the transfer preset (no mixing: it slows the LR students here).
DEMO_KD := --unlabelled $(DEMO_DATA)/unlabelled.csv --alpha 0.1 --beta 0.9
TEST_ARGS := --data-dir $(DEMO_DATA) --out-dir $(DEMO_RUNS)
# The demo's figures are the README's: written to assets/ on purpose (a run's own go to
# <out-dir>/figures); other seeds keep theirs in their run folder.
DEMO_ASSETS ?= $(if $(filter 0,$(DEMO_SEED)),assets,$(DEMO_RUNS)/figures)
FIGURES := --assets-dir $(DEMO_ASSETS)

.PHONY: demo test test-fast bench bench-processes clean-demo

$(PY): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $(PY)

# The optional trackers (--tensorboard, --wandb): the tests read their files back; the
# demo and training never need them.
$(VENV)/.trackers: requirements-trackers.txt | $(PY)
	$(PY) -m pip install -q -r requirements-trackers.txt
	touch $@

$(DEMO_DATA)/train.csv: | $(PY)
	$(PY) make_demo_data.py --out $(DEMO_DATA) $(DEMO_DATA_ARGS)

demo: $(PY) $(DEMO_DATA)/train.csv
	$(PY) check_data.py --data-dir $(DEMO_DATA)
	$(PY) train_teacher.py $(DEMO_ARGS)
	$(PY) train_student.py $(DEMO_ARGS)
	$(PY) train_kd_student.py $(DEMO_ARGS) $(DEMO_KD)
	$(PY) test_teacher.py $(TEST_ARGS) $(FIGURES)
	$(PY) test_student.py $(TEST_ARGS) $(FIGURES)
	$(PY) test_kd_student.py $(TEST_ARGS) $(FIGURES)
	$(PY) evaluate_all.py $(TEST_ARGS) $(FIGURES)
	$(PY) predict.py $(TEST_ARGS) --stage student --tta --overwrite
	$(PY) predict.py $(TEST_ARGS) --stage kd_student --tta --overwrite

# TEST_WORKERS pytest-xdist processes, each torch with one thread so that they do not fight
# over the cores (2 on CI's 2-core machines: measured 1.6x faster than one process).
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS)

test: $(PY) $(VENV)/.trackers
	$(PYTEST) --durations=15 tests

test-fast: $(PY) $(VENV)/.trackers
	$(PYTEST) -m fast tests

bench: $(PY)
	$(PY) benchmark.py

# Seconds per epoch of the demo teacher with 1 and 2 processes under torchrun.
bench-processes: $(PY) $(DEMO_DATA)/train.csv
	$(PY) benchmark.py --processes 1 2 --data-dir $(DEMO_DATA) --out-dir runs/bench-processes \
	    -- $(DEMO_TRAIN) --epochs 3

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_RUNS)
